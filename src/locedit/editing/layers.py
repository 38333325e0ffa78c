"""Which layers an edit "at layer l" touches, and which layers the sweep edits.

Layers are 0-based indices into the architecture table. The paper numbers layers from 1
(GPT-J's ROME default "layer 6" is index 5), so its grids are stored here shifted by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from locedit.default_layers import round_half_up, scaled_default_layer
from locedit.editing.hparams import HParams
from locedit.editing.methods import METHODS, get_method, key_stats_methods

#: Paper grids (1-based in the paper: GPT-J §4, GPT2-XL App. C), as 0-based indices by depth.
PAPER_GRIDS: dict[int, tuple[int, ...]] = {
    28: tuple(x - 1 for x in (1, 5, 6, 9, 13, 17, 21, 25, 28)),
    48: tuple(x - 1 for x in (1, 5, 9, 13, 17, 18, 21, 25, 29, 33, 37, 41, 45, 48)),
}


def edit_layers(
    method: str, layer: int, n_layers: int, hparams: HParams | None = None
) -> list[int]:
    """Layers an edit of ``method`` centred on ``layer`` changes (see :meth:`EditMethod.layers`)."""
    return get_method(method).layers(layer, n_layers, hparams)


def default_layer(method: str, n_layers: int) -> int:
    """The layer each method edits by default, scaled from the originals' choices.

    GPT-J (28 layers) and GPT2-XL (48) get the originals' layers exactly. Other depths get the
    mean relative position of those two choices (5/27 and 17/47 of the way up, about 0.27),
    rounded: 5 of 18 layers for Gemma-3-270M, 8 of 30 for SmolLM2-135M. The paper tunes and
    reports every method at the same default layer, so the method does not change it; MEMIT
    and FT-5 centre their window on it.
    """
    get_method(method)
    return scaled_default_layer(n_layers)


def evenly_spaced(n_layers: int, n_grid: int) -> list[int]:
    """``n_grid`` layers from the first to the last, as evenly spaced as integers allow."""
    if n_grid <= 0:
        return []
    if n_grid == 1:
        return [n_layers // 2]
    n_grid = min(n_grid, n_layers)
    return sorted({round_half_up(i * (n_layers - 1) / (n_grid - 1)) for i in range(n_grid)})


def layer_grid(
    n_layers: int,
    n_grid: int | None = 5,
    methods: Iterable[str] = METHODS,
    paper_grids: bool = True,
) -> list[int]:
    """The layers the sweep edits.

    GPT-J and GPT2-XL depths (28, 48) get the paper's grids (DESIGN.md §4) when
    ``paper_grids`` is set; other models get ``n_grid`` evenly spaced layers plus each
    method's default layer.
    """
    methods = [get_method(m).name for m in methods]
    if paper_grids and n_layers in PAPER_GRIDS:
        return list(PAPER_GRIDS[n_layers])
    grid = set(evenly_spaced(n_layers, n_grid or 0))
    grid.update(default_layer(m, n_layers) for m in methods)
    return sorted(grid)


def layers_needing_covariance(
    layers: Sequence[int], methods: Iterable[str], n_layers: int
) -> list[int]:
    """Every layer whose down-projection a key-statistics method (ROME, MEMIT, EMMET, AlphaEdit)
    may edit for edits at ``layers``."""
    needed: set[int] = set()
    for method in key_stats_methods(methods):
        for layer in layers:
            needed.update(edit_layers(method, layer, n_layers))
    return sorted(needed)


def sweep_layers(edit_cfg: Mapping[str, Any], n_layers: int) -> list[int]:
    """The layers the sweep edits: explicit ``edit.layers`` (checked against the model's
    depth) if given, else :func:`layer_grid` of ``edit.n_grid_layers`` for ``edit.methods``."""
    layers = edit_cfg.get("layers")
    if layers:
        bad = [layer for layer in layers if not 0 <= int(layer) < n_layers]
        if bad:
            raise IndexError(
                f"edit.layers {bad} out of range: the model has layers 0..{n_layers - 1}"
            )
        return sorted({int(layer) for layer in layers})
    return layer_grid(n_layers, edit_cfg.get("n_grid_layers", 5), edit_cfg["methods"])
