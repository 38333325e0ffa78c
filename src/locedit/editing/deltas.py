"""Weight changes applied in the forward instead of written into the weights (issue 28): G
edited models in one batch, each block of rows with its own change, for measuring G edits
together (:func:`weight_deltas_by_group`) and for training G finetunings together
(:mod:`locedit.editing.grouped_finetune`). Every method's grouped path uses it, so it belongs
to none of them: a change here reruns every grouped row, one to a method's module only its."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from locedit.models.architecture import get_module
from locedit.models.hooks import edited_from_inputs


def linear_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A trained module's weight as ``F.linear`` takes it: [out, in]."""
    if isinstance(module, nn.Linear):
        return weight
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style [in, out] layer
        return weight.T
    raise ValueError(
        f"edits applied in the forward support the weights of Linear and Conv1D modules, "
        f"not of {type(module).__name__}"
    )


@contextmanager
def weight_deltas_by_group(
    model: nn.Module, deltas: Sequence[Mapping[str, torch.Tensor]]
) -> Iterator[None]:
    """Forward batches of G equal blocks of rows, block g as if ``deltas[g]`` (parameter name
    -> change, in storage layout) were added to the weights: G edited models without editing
    the model (issue 28), for measuring G edits of one fact in one batch.

    The changed parameters must be weights and biases of ``nn.Linear`` or ``Conv1D`` modules
    (the down-projections ROME, MEMIT, EMMET and AlphaEdit change, the MLP weights finetuning
    trains): each adds ``x dW_g^T + db_g`` to its module's output for block g's rows, in
    float32, and leaves the blocks of edits that do not change it as they are. Equal to
    writing the update into the weights up to rounding.
    """
    groups = len(deltas)
    by_module: dict[str, set[str]] = {}
    for name in sorted({name for delta in deltas for name in delta}):
        path, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias"):
            raise ValueError(f"weight_deltas_by_group supports weights and biases, not {name}")
        by_module.setdefault(path, set()).add(kind)
    modules, edits = {}, {}
    for path, kinds in by_module.items():
        module = get_module(model, path)
        out_in = linear_out_in(module, module.weight)  # refuses other module types
        names = [f"{path}.{kind}" for kind in kinds]
        # Only the groups that change this module hold a stacked change: a fact's 10 MEMIT
        # edits change 5 modules each but up to 28 in all on GPT-J, whose dense float32
        # [out, in] change is 268 MB: 13 GB for what the edits change, not 75 GB for every
        # (edit, module) pair.
        owners = [g for g, delta in enumerate(deltas) if any(n in delta for n in names)]

        def stacked(name: str, like: torch.Tensor, view=lambda t: t, owners=owners) -> torch.Tensor:
            zero = torch.zeros_like(like, dtype=torch.float32)
            return torch.stack([
                view(deltas[g][name].float()) if name in deltas[g] else zero for g in owners
            ])

        weights = (
            stacked(f"{path}.weight", out_in, lambda t, m=module: linear_out_in(m, t))
            if "weight" in kinds else None
        )
        biases = stacked(f"{path}.bias", module.bias) if "bias" in kinds else None

        index = torch.tensor(owners, device=module.weight.device)

        def add(x, hidden, weights=weights, biases=biases, index=index):
            size = int(hidden.shape[0])
            if size % groups:
                raise ValueError(f"a batch of {size} rows is not {groups} equal blocks")
            blocks = hidden.reshape(groups, size // groups, *hidden.shape[1:])
            change = torch.zeros(
                (len(index), *blocks.shape[1:]), dtype=torch.float32, device=hidden.device
            )
            if weights is not None:
                inputs = x.reshape(groups, size // groups, *x.shape[1:])[index].float()
                change = change + torch.einsum("gn...i,goi->gn...o", inputs, weights)
            if biases is not None:
                shape = (len(index),) + (1,) * (change.dim() - 2) + (biases.shape[-1],)
                change = change + biases.reshape(shape)
            changed = blocks[index] + change.to(hidden.dtype)
            return blocks.index_copy(0, index, changed).reshape(hidden.shape)

        modules[path], edits[path] = module, add
    with edited_from_inputs(modules, edits):
        yield
