"""Forward passes of an :class:`~locedit.editing.batch.EditBatch` through the intervention
toolkit (:mod:`locedit.models.hooks`): with each row's subject noise, only as far as a module,
reading or shifting a module's output at each row's lookup token (ROME's ``compute_u`` keys,
``compute_v``'s added delta; paper Sec. 5.2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from locedit.editing.batch import EditBatch
from locedit.models import hooks
from locedit.models.noise import positioned_noise


@contextmanager
def batch_noise(model: nn.Module, batch: EditBatch) -> Iterator[None]:
    """Apply each row's s_noise at its subject tokens through :func:`noised_subject` (the
    sample's first ``subject_len`` tokens: all of them, unless the batch stacks the noise of
    subjects of different lengths, padded to the longest)."""
    if batch.noise is None:
        yield
        return
    entries = [
        (row, batch.subject_start[row], batch.noise[sample, : batch.subject_len[row]])
        for row, sample in enumerate(batch.noise_sample)
        if sample is not None
    ]
    with positioned_noise(model, entries, batch.size):
        yield


def hidden_states(model: nn.Module, batch: EditBatch) -> torch.Tensor:
    """Final-norm hidden states of the base model for the batch (noise applied)."""
    with batch_noise(model, batch):
        return model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state


def run_batch_until(model: nn.Module, batch: EditBatch, module: nn.Module) -> None:
    """Forward the batch (no grad, noise applied) only as far as ``module``."""
    hooks.run_until(lambda: hidden_states(model, batch), module)


@contextmanager
def captured_io(module: nn.Module, positions: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """The module's input and output at one position per row, from the first forward.

    Used on a down-projection: its input is the MLP key k, its output the value W k + b.
    """

    found: dict[str, torch.Tensor] = {}

    def read(inputs, output) -> bool:
        rows = torch.arange(inputs[0].shape[0], device=positions.device)
        found["input"] = inputs[0][rows, positions].detach()
        found["output"] = hooks.hidden_of(output)[rows, positions].detach()
        return True

    with hooks.recorded({0: module}, read):
        yield found


@contextmanager
def added_at(
    module: nn.Module, positions: torch.Tensor, width: int, delta: torch.Tensor
) -> Iterator[dict]:
    """Add ``delta`` to the module's output at one position per row (out of place).

    Yields a dict that receives ``init``: the unchanged output at those positions in the
    first forward, [B, d_model].
    """
    size = int(positions.shape[0])
    rows = torch.arange(size, device=positions.device)
    mask = torch.zeros(size, width, 1, device=positions.device)
    mask[rows, positions] = 1.0
    state: dict[str, torch.Tensor] = {}

    def add(value: torch.Tensor) -> torch.Tensor:
        if "init" not in state:
            state["init"] = value[rows, positions].detach().clone()
        return value + mask.to(value.dtype) * delta.to(value.dtype)

    with hooks.edited_output(module, add):
        yield state


@contextmanager
def added_per_group(
    modules: Sequence[nn.Module], groups: torch.Tensor, deltas: Callable[[], torch.Tensor]
) -> Iterator[dict]:
    """Add group g's delta to ``modules[g]``'s output at position 0 of group g's rows.

    The batched form of :func:`added_at` for independent edits optimised together
    (:func:`locedit.editing.vstar.optimise_vstars`): ``groups`` [B] names each row's group,
    ``deltas()`` gives the stacked deltas [G, d] of the current step. Rows of one module's
    groups are gathered by index, so a gradient reaches only its own group's delta (a NaN in
    one group's rows cannot spread to another's). Yields a dict that receives ``init``: each
    row's unchanged output at position 0 in the first forward of its module, [B, d].
    """
    state: dict[str, torch.Tensor] = {}
    by_module: dict[int, tuple[nn.Module, list[int]]] = {}
    for g, module in enumerate(modules):
        by_module.setdefault(id(module), (module, []))[1].append(g)
    edits: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
    seen: set[int] = set()
    for key, (_module, owned) in by_module.items():
        in_module = torch.isin(groups, torch.tensor(owned, device=groups.device))
        rows = torch.nonzero(in_module)[:, 0]
        zeros = torch.zeros_like(rows)

        def add(value, key=key, rows=rows, zeros=zeros, owners=groups[rows]):
            if key not in seen:
                seen.add(key)
                init = state.setdefault(
                    "init", torch.zeros(value.shape[0], value.shape[-1], dtype=value.dtype,
                                        device=value.device)
                )
                init[rows] = value[rows, zeros].detach()
            added = deltas()[owners].to(value.dtype)
            return value.index_put((rows, zeros), added, accumulate=True)

        edits[key] = add
    with hooks.edited_outputs({k: m for k, (m, _) in by_module.items()}, edits):
        yield state
