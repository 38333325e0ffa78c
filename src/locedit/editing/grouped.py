"""Independent edits optimised together: their v*/z* in one batch (issue 28, DESIGN.md §7),
and the group size the sweep uses.

Edits that do not depend on each other (one fact at several layers, several facts at one
layer) have independent v*/z* optimisations: rows of one batch, each edit's delta at its own
layer and lookup tokens (:func:`locedit.editing.vstar.optimise_vstars`, equal to one run per
edit). What follows the optimisation (keys, covariance solves, MEMIT's layer spread, the
weight write and its restoration) still runs per edit in :func:`locedit.editing.edited`,
which takes the precomputed v*/z* through its ``vstars`` argument. Finetuning's batched run is
:mod:`locedit.editing.grouped_finetune`, the dispatch by method
:func:`locedit.editing.editor.optimise_together`, and measuring G edited models in one batch
:mod:`locedit.editing.deltas`: none of them imports this module, so a change here reruns only
the rows of the methods with v*/z*.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.editing.covariance import CovarianceStore
from locedit.editing.editor import prepared
from locedit.editing.types import EditFailed, GroupedEdit
from locedit.editing.vstar import VStar, optimise_vstars
from locedit.models.architecture import text_config
from locedit.models.device import attention_without_cudnn, model_device


def grouped_vstars(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    edits: Sequence[GroupedEdit],
    covariance: CovarianceStore | None = None,
) -> list[tuple[VStar | EditFailed, ...]]:
    """Each edit's v*/z* (the ``vstars`` that :func:`~locedit.editing.edited` takes), every
    edit's optimisations run as one batch (the ``batched_fit`` of ROME, MEMIT, EMMET and
    AlphaEdit; :func:`locedit.editing.editor.optimise_together` dispatches to it). A method
    without v*/z* gets ``()``; an optimisation that fails comes back as its
    :class:`EditFailed` and fails only its edit.
    """
    counts, jobs = [], []
    for edit in edits:
        spec, hparams, layers, templates = prepared(
            model, tokenizer, edit.method, edit.layer, edit.hparams, covariance, edit.co_requests
        )
        call = spec.call(
            model, tokenizer, edit.request, edit.layer, layers, hparams, covariance, templates,
            edit.co_requests,
        )
        mine = spec.jobs(call)
        counts.append(len(mine))
        jobs.extend(mine)
    with attention_without_cudnn():  # as EditMethod.run: bfloat16 on Hopper
        results = optimise_vstars(model, jobs)
    out, start = [], 0
    for count in counts:
        out.append(tuple(results[start : start + count]))
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
    config = text_config(model)
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


def largest_group(setting: int | None, device: torch.device) -> int:
    """The most edits ``edit.group_size`` can put in a group on ``device``, known before any
    model is loaded (the sweep's driver packs jobs by it): the number itself, or for ``null``
    1 on a CPU and :data:`MAX_GROUP` on a GPU (each worker then takes what its memory holds,
    :func:`default_group_size`)."""
    if setting is None:
        return 1 if device.type != "cuda" else MAX_GROUP
    return _checked(setting)


def _checked(setting: int) -> int:
    if int(setting) < 1:
        raise ValueError(f"edit.group_size must be >= 1 or null, got {setting}")
    return int(setting)


def group_size_from(setting: int | None, model: nn.Module) -> int:
    """``edit.group_size``: a positive number as it is, ``null`` the default for the device."""
    if setting is None:
        return default_group_size(model)
    return _checked(setting)
