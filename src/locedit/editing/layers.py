"""Which layers an edit "at layer l" touches, and which layers the sweep edits.

Layers are 0-based indices into the architecture table. The paper numbers layers from 1
(GPT-J's ROME default "layer 6" is index 5), so its grids are stored here shifted by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

Method = Literal["rome", "memit", "ft1", "ft5"]

#: The editing methods of the paper (Sec. 5.2): ROME, MEMIT, constrained finetuning of 1 and 5 layers.
METHODS: tuple[Method, ...] = ("rome", "memit", "ft1", "ft5")

#: Layers each method spreads one edit over (MEMIT and FT-5 use the paper's window of 5).
WINDOWS: dict[str, int] = {"rome": 1, "ft1": 1, "memit": 5, "ft5": 5}

#: Paper grids (1-based in the paper: GPT-J §4, GPT2-XL App. C), as 0-based indices by depth.
PAPER_GRIDS: dict[int, tuple[int, ...]] = {
    28: tuple(x - 1 for x in (1, 5, 6, 9, 13, 17, 21, 25, 28)),
    48: tuple(x - 1 for x in (1, 5, 9, 13, 17, 18, 21, 25, 29, 33, 37, 41, 45, 48)),
}

#: The originals' default edit layers (0-based): ROME on GPT-J is layer 5 of 28 (the paper's
#: "layer 6", also where it tunes every method), on GPT2-XL layer 17 of 48 (the paper's 18).
ORIGINAL_DEFAULT_LAYERS: dict[int, int] = {28: 5, 48: 17}


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown edit method {method!r}; choose from {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def edit_layers(method: str, layer: int, n_layers: int) -> list[int]:
    """Layers an edit centred on ``layer`` changes.

    ROME and FT-1 edit ``layer`` alone. MEMIT and FT-5 edit the window of 5 centred on it,
    ``[l - 2, l + 2]``, clipped (not shifted) at the model's ends: the paper's code uses the
    same rule as Causal Tracing's restoration window so the two cover identical layers
    (Sec. 5.2; App. Fig. 11 describes the clipping), so an edit at layer 0 touches 0..2.
    """
    check_method(method)
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    window = WINDOWS[method]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def default_layer(method: str, n_layers: int) -> int:
    """The layer each method edits by default, scaled from the originals' choices.

    GPT-J (28 layers) and GPT2-XL (48) get the originals' layers exactly. Other depths get the
    mean relative position of those two choices (5/27 and 17/47 of the way up, about 0.27),
    rounded: 5 of 18 layers for Gemma-3-270M, 8 of 30 for SmolLM2-135M. The paper tunes and
    reports every method at the same default layer, so the method does not change it; MEMIT
    and FT-5 centre their window on it.
    """
    check_method(method)
    if n_layers in ORIGINAL_DEFAULT_LAYERS:
        return ORIGINAL_DEFAULT_LAYERS[n_layers]
    if n_layers < 1:
        raise ValueError("a model needs at least one layer")
    fractions = [layer / (depth - 1) for depth, layer in ORIGINAL_DEFAULT_LAYERS.items()]
    return _round_half_up(sum(fractions) / len(fractions) * (n_layers - 1))


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def evenly_spaced(n_layers: int, n_grid: int) -> list[int]:
    """``n_grid`` layers from the first to the last, as evenly spaced as integers allow."""
    if n_grid <= 0:
        return []
    if n_grid == 1:
        return [n_layers // 2]
    n_grid = min(n_grid, n_layers)
    return sorted({_round_half_up(i * (n_layers - 1) / (n_grid - 1)) for i in range(n_grid)})


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
    methods = [check_method(m) for m in methods]
    if paper_grids and n_layers in PAPER_GRIDS:
        return list(PAPER_GRIDS[n_layers])
    grid = set(evenly_spaced(n_layers, n_grid or 0))
    grid.update(default_layer(m, n_layers) for m in methods)
    return sorted(grid)


def layers_needing_covariance(
    layers: Sequence[int], methods: Iterable[str], n_layers: int
) -> list[int]:
    """Every layer whose down-projection ROME or MEMIT may edit for edits at ``layers``."""
    needed: set[int] = set()
    for method in methods:
        if check_method(method) in ("rome", "memit"):
            for layer in layers:
                needed.update(edit_layers(method, layer, n_layers))
    return sorted(needed)
