"""Independent edits optimised together: their v*/z* in one batch (issue 28, DESIGN.md §7).

Edits that do not depend on each other (one fact at several layers, several facts at one
layer) have independent v*/z* optimisations: rows of one batch, each edit's delta at its own
layer and lookup tokens (:func:`locedit.editing.vstar.optimise_vstars`, equal to one run per
edit). What follows the optimisation (keys, covariance solves, MEMIT's layer spread, the
weight write and its restoration) still runs per edit in :func:`locedit.editing.edited`,
which takes the precomputed v*/z* through its ``vstars`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.editing.covariance import CovarianceStore
from locedit.editing.editor import prepared
from locedit.editing.hparams import HParams
from locedit.editing.types import EditFailed, EditRequest
from locedit.editing.vstar import VStar, optimise_vstars


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
) -> list[tuple[VStar | EditFailed, ...]]:
    """Each edit's v*/z* (the ``vstars`` that :func:`~locedit.editing.edited` takes), every
    edit's optimisations run as one batch. A method without any (finetuning) gets ``()``;
    an optimisation that fails comes back as its :class:`EditFailed` and fails only its edit.
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
    results = optimise_vstars(model, jobs)
    out, start = [], 0
    for count in counts:
        out.append(tuple(results[start : start + count]))
        start += count
    return out
