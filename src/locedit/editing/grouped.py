"""Independent edits optimised together: their v*/z* in one batch (issue 28, DESIGN.md §7).

Edits that do not depend on each other (one fact at several layers, several facts at one
layer) have independent v*/z* optimisations: rows of one batch, each edit's delta at its own
layer and lookup tokens (:func:`locedit.editing.vstar.optimise_vstars`, equal to one run per
edit). What follows the optimisation (keys, covariance solves, MEMIT's layer spread, the
weight write and its restoration) still runs per edit in :func:`locedit.editing.edited`,
which takes the precomputed v*/z* through its ``vstars`` argument.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.editing.covariance import CovarianceStore
from locedit.editing.editor import prepared
from locedit.editing.grouped_finetune import FinetuneOutcome, linear_out_in
from locedit.editing.hparams import HParams
from locedit.editing.methods import get_method
from locedit.editing.types import EditFailed, EditRequest
from locedit.editing.vstar import VStar, optimise_vstars
from locedit.models.architecture import get_module
from locedit.models.device import attention_without_cudnn, model_device
from locedit.models.hooks import edited_from_inputs


@dataclass(frozen=True)
class GroupedEdit:
    """One edit of a group: what :func:`locedit.editing.edited` would be called with."""

    method: str
    request: EditRequest
    layer: int
    hparams: HParams | None = None
    co_requests: tuple[EditRequest, ...] = ()


def grouped_vstars(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    edits: Sequence[GroupedEdit],
    covariance: CovarianceStore | None = None,
) -> list[tuple[VStar | FinetuneOutcome | EditFailed, ...]]:
    """Each edit's optimisation outcome (the ``vstars`` that :func:`~locedit.editing.edited`
    takes), every edit's optimisations run as one batch: the v*/z* of ROME, MEMIT, EMMET and
    AlphaEdit (:func:`optimise_vstars`), finetuning's trained weights (one batch per
    hyperparameter setting, :func:`~locedit.editing.grouped_finetune.grouped_finetune`). An
    optimisation that fails comes back as its :class:`EditFailed` and fails only its edit.
    """
    out: list[tuple] = [()] * len(edits)
    counts, jobs, owners = [], [], []
    fits: dict[tuple[str, str], list[tuple[int, EditRequest, list[int], HParams]]] = {}
    for index, edit in enumerate(edits):
        spec, hparams, layers, templates = prepared(
            model, tokenizer, edit.method, edit.layer, edit.hparams, covariance, edit.co_requests
        )
        if spec.batched_fit is not None:
            fits.setdefault((edit.method, repr(hparams)), []).append(
                (index, edit.request, layers, hparams)
            )
            continue
        call = spec.call(
            model, tokenizer, edit.request, edit.layer, layers, hparams, covariance, templates,
            edit.co_requests,
        )
        mine = spec.jobs(call)
        counts.append(len(mine))
        owners.append(index)
        jobs.extend(mine)
    with attention_without_cudnn():  # as EditMethod.run: bfloat16 on Hopper
        results = optimise_vstars(model, jobs)
        for (method, _), members in fits.items():
            found = get_method(method).fit_together(
                model, tokenizer, [m[1] for m in members], [m[2] for m in members],
                members[0][3],
            )
            for (index, *_), outcome in zip(members, found, strict=True):
                out[index] = (outcome,)
    start = 0
    for index, count in zip(owners, counts, strict=True):
        out[index] = tuple(results[start : start + count])
        start += count
    return out


#: The largest group :func:`default_group_size` proposes (the benchmark's largest size).
MAX_GROUP = 64
#: What one v*/z* job holds during its backward, in rows x tokens (ROME's ~21 rewriting rows
#: plus the KL row, suffixes of up to ~16 tokens, up to ~4 target tokens per row).
_ROWS, _TOKENS, _TARGETS = 24, 16, 4


def job_bytes(model: nn.Module) -> int:
    """A generous estimate of one v*/z* job's memory: every layer's activations kept for the
    backward (about 12 d_model + 4 d_mlp floats per token) and the target positions'
    full-vocabulary logits, log-probabilities and their gradient, in float32."""
    config = model.config
    d_model = int(config.hidden_size)
    d_mlp = int(getattr(config, "intermediate_size", None) or 4 * d_model)
    layers = int(config.num_hidden_layers)
    activations = _ROWS * _TOKENS * layers * (12 * d_model + 4 * d_mlp) * 4
    logits = _ROWS * _TARGETS * int(config.vocab_size) * 4 * 3
    return activations + logits


def default_group_size(model: nn.Module, share: float = 0.5) -> int:
    """``edit.group_size: null``: 1 on a CPU (the default until the benchmark shows a larger
    group is faster there, README "Throughput"); on a GPU as many jobs as fit in ``share`` of
    its free memory by :func:`job_bytes`, at most :data:`MAX_GROUP`."""
    device = model_device(model)
    if device.type != "cuda":
        return 1
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_GROUP, int(share * free) // max(1, job_bytes(model))))


def group_size_from(setting: int | None, model: nn.Module) -> int:
    """``edit.group_size``: a positive number as it is, ``null`` the default for the device."""
    if setting is None:
        return default_group_size(model)
    if int(setting) < 1:
        raise ValueError(f"edit.group_size must be >= 1 or null, got {setting}")
    return int(setting)


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
    float32. Equal to writing the update into the weights up to rounding.
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

        def stacked(name: str, like: torch.Tensor, view=lambda t: t) -> torch.Tensor:
            zero = torch.zeros_like(like, dtype=torch.float32)
            return torch.stack([view(d[name].float()) if name in d else zero for d in deltas])

        weights = (
            stacked(f"{path}.weight", out_in, lambda t, m=module: linear_out_in(m, t))
            if "weight" in kinds else None
        )
        biases = stacked(f"{path}.bias", module.bias) if "bias" in kinds else None

        def add(x, hidden, weights=weights, biases=biases):
            size = int(hidden.shape[0])
            if size % groups:
                raise ValueError(f"a batch of {size} rows is not {groups} equal blocks")
            change = torch.zeros(
                (groups, size // groups, *hidden.shape[1:]), dtype=torch.float32,
                device=hidden.device,
            )
            if weights is not None:
                blocks = x.reshape(groups, size // groups, *x.shape[1:]).float()
                change = change + torch.einsum("gn...i,goi->gn...o", blocks, weights)
            if biases is not None:
                shape = (groups,) + (1,) * (change.dim() - 2) + (biases.shape[-1],)
                change = change + biases.reshape(shape)
            return hidden + change.reshape(hidden.shape).to(hidden.dtype)

        modules[path], edits[path] = module, add
    with edited_from_inputs(modules, edits):
        yield
