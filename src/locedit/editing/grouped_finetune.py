"""Independent constrained finetunings trained together (issue 28): FT-1 / FT-5 of G edits as
one batch, each equal to its own :func:`~locedit.editing.finetune.apply_finetune` run.

The G edits' batches are stacked (right-padded to one width, so every row's positions and
mask stay its own). Each edit trains its own copy of its window's weights: in every trained
module, edit g's rows go through ``F.linear`` with edit g's copies (and the module's own
weights where g trains none), every other row through the module as it is
(:func:`~locedit.models.hooks.edited_from_inputs`). The losses are summed for one backward:
rows are independent, so each copy gets exactly its own edit's gradient. The copies are
separate tensors of one Adam (elementwise, with a step count per tensor: G optimisers), each
edit with its own L-infinity projection, early stop and failure. An edit that stops (early
stop, non-finite loss or weights) leaves the sum and gets no gradient (``grad = None``), so
Adam leaves its copies and their state untouched from then on, as the sequential run's
Trainer stops. Training on a copy of W instead of W itself keeps Adam's weight decay, the
ball and its float32 bounds exactly those of the sequential run; only the matmul's summation
order can differ. The LightningModule below is the training loop, as in
:class:`~locedit.editing.finetune.ConstrainedFinetune`.

Half-precision weights train as the sequential run trains them: Adam steps each edit's
float32 master copies, and the edit's rows go through the masters rounded to the weights'
dtype. Modules other than ``nn.Linear`` / ``Conv1D`` are refused with a ``ValueError``: the
sweep then trains those edits one by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from locedit.data.records import Direction
from locedit.editing.batch import EditBatch, build_batch
from locedit.editing.deltas import linear_out_in
from locedit.editing.editor import prepared
from locedit.editing.finetune import (
    clamp_into,
    d_mlp,
    effective_linf_eps,
    finetuned_param_names,
    fit,
    is_half,
    linf_bounds,
    overshoot,
    pass_gradient_to_master,
    round_master_into,
)
from locedit.editing.forward import hidden_states
from locedit.editing.hparams import FTHParams
from locedit.editing.loss import batch_target_log_probs, objective
from locedit.editing.types import EditFailed, EditRequest, GroupedEdit
from locedit.models.architecture import get_module
from locedit.models.device import attention_without_cudnn, model_device
from locedit.models.hooks import edited_from_inputs
from locedit.models.scoring import pad_token_id
from locedit.models.tokens import encode_target


@dataclass
class FinetuneOutcome:
    """One edit's finetuning as a batched run left it: what ``apply_finetune`` writes into
    the weights (``weights``, storage layout) and reports, instead of training."""

    weights: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    nlls: list[float] = field(default_factory=list)
    max_overshoot: float = 0.0


def stacked_batches(batches: Sequence[EditBatch], pad_id: int) -> EditBatch:
    """The rows of ``batches`` in order as one batch, right-padded to the widest (``n_target``
    is the first batch's: the caller keeps each edit's own). Subject noise, when the batches
    have it (all or none: one problem), is stacked: every batch's samples, padded with zeros to
    the longest subject (a row takes its ``subject_len`` tokens), its rows' sample indices
    shifted to its own."""
    width = max(int(b.input_ids.shape[1]) for b in batches)
    noised = [b.noise is not None for b in batches]
    if any(noised) and not all(noised):
        raise ValueError("batched finetuning needs subject noise in every edit or in none")
    noise, noise_sample = None, sum((b.noise_sample for b in batches), ())
    if all(noised):
        tokens = max(int(b.noise.shape[1]) for b in batches)
        noise = torch.cat([F.pad(b.noise, (0, 0, 0, tokens - int(b.noise.shape[1])))
                           for b in batches])
        shifted, first = [], 0
        for b in batches:
            shifted += [None if s is None else s + first for s in b.noise_sample]
            first += int(b.noise.shape[0])
        noise_sample = tuple(shifted)

    def padded(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, width - int(tensor.shape[1])), value=value)

    offsets = [0]
    for b in batches[:-1]:
        offsets.append(offsets[-1] + b.size)
    return EditBatch(
        input_ids=torch.cat([padded(b.input_ids, pad_id) for b in batches]),
        attention_mask=torch.cat([padded(b.attention_mask, 0) for b in batches]),
        lookup=torch.cat([b.lookup for b in batches]),
        subject_start=sum((b.subject_start for b in batches), ()),
        subject_len=sum((b.subject_len for b in batches), ()),
        rewrite=torch.cat([b.rewrite for b in batches]),
        bare=torch.cat([b.bare for b in batches]),
        kl=torch.cat([b.kl for b in batches]),
        target_rows=torch.cat([b.target_rows + o for b, o in zip(batches, offsets, strict=True)]),
        target_cols=torch.cat([b.target_cols for b in batches]),
        target_tokens=torch.cat([b.target_tokens for b in batches]),
        n_target=batches[0].n_target,
        noise=noise,
        noise_sample=noise_sample,
        template=sum((b.template for b in batches), ()),
    )


@dataclass
class _Edit:
    """One edit inside :class:`GroupedFinetune`."""

    rows: slice
    n_rewrite: int
    n_target: int
    direction: Direction
    #: the weights its rows go through, in the model's dtype (trained in place when float32)
    weights: dict[str, torch.Tensor]
    #: what Adam trains: the float32 weights themselves, or the half-precision weights'
    #: float32 masters (as :class:`~locedit.editing.finetune.ConstrainedFinetune`)
    copies: dict[str, torch.Tensor]
    outcome: FinetuneOutcome
    running: bool = True
    failure: EditFailed | None = None

    def fail(self, reason: str) -> None:
        self.running, self.failure = False, EditFailed("ft", reason)


class GroupedFinetune(pl.LightningModule):
    """:class:`~locedit.editing.finetune.ConstrainedFinetune` for G independent edits."""

    def __init__(
        self,
        model: nn.Module,
        batch: EditBatch,
        edits: list[_Edit],
        hp: FTHParams,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not registered: see finetune.py
        self.batch, self.edits, self.hp = batch, edits, hp
        self.eps = effective_linf_eps(hp, d_mlp(model))
        named = dict(model.named_parameters())
        names = sorted({name for e in edits for name in e.copies})
        self.bounds = {name: linf_bounds(named[name].detach(), self.eps) for name in names}
        self.master_bounds = {
            name: linf_bounds(named[name].detach().float(), self.eps)
            for name in names if is_half(named[name])
        }
        if not any(bool(((lo != named[n]) | (hi != named[n])).any())
                   for n, (lo, hi) in self.bounds.items()):
            dtypes = sorted({str(named[n].dtype).removeprefix("torch.") for n in names})
            for edit in edits:
                edit.fail(f"linf_eps {self.eps:g} is below the {'/'.join(dtypes)} resolution "
                          "of every trained weight: no weight can change (use "
                          "model.dtype=float32 or a larger linf_eps)")
        self.stepping: list[_Edit] = []

    def configure_optimizers(self):
        params = [copy for edit in self.edits for copy in edit.copies.values()]
        return torch.optim.Adam(params, lr=self.hp.lr, weight_decay=self.hp.weight_decay)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(range(self.hp.steps)), batch_size=None)

    def on_train_start(self) -> None:
        self.model.eval()

    def on_train_epoch_start(self) -> None:
        self.model.eval()

    def on_train_batch_start(self, _batch, _batch_idx):
        return None if any(e.running for e in self.edits) else -1

    def objectives(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every edit's (loss, NLL) on the current copies."""
        hidden = hidden_states(self.model, self.batch)
        totals = batch_target_log_probs(self.model, hidden, self.batch)
        parts = totals.split([e.n_rewrite for e in self.edits])
        return [objective(p, e.n_target, e.direction) for p, e in zip(parts, self.edits, strict=True)]

    def training_step(self, _batch, batch_idx):
        found = self.objectives()
        values = torch.stack([torch.stack([loss.detach(), nll.detach()]) for loss, nll in found]).tolist()
        stop = self.hp.early_stop_loss
        self.stepping, total = [], None
        for edit, (loss, _), (loss_value, nll_value) in zip(self.edits, found, values, strict=True):
            if not edit.running:
                continue
            if not (math.isfinite(loss_value) and math.isfinite(nll_value)):
                edit.fail(f"non-finite loss {loss_value} at step {batch_idx}")
                continue
            edit.outcome.losses.append(loss_value)
            edit.outcome.nlls.append(nll_value)
            if edit.direction == "maximize" and stop is not None and nll_value < stop:
                edit.running = False  # converged: no step, as the sequential run
                continue
            self.stepping.append(edit)
            total = loss if total is None else total + loss
        return total

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        def closure():
            loss = optimizer_closure()
            stepping = {id(e) for e in self.stepping}
            for edit in self.edits:
                for name, copy in edit.copies.items():
                    weight = edit.weights[name]
                    if id(edit) in stepping:
                        if copy is not weight:  # a master takes its weight's gradient
                            pass_gradient_to_master(weight, copy)
                        continue
                    copy.grad = None  # Adam skips it: no step, no state change
                    if copy is not weight:
                        weight.grad = None  # the optimiser zeroes only what it trains
            return loss

        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        self.project_to_linf_ball()

    @torch.no_grad()
    def project_to_linf_ball(self) -> None:
        """Each stepped edit's weights back into their ball (half-precision weights: their
        masters into the float32 ball, then rounded, as the sequential run); one with
        non-finite weights fails (and gets the original weights back, so its rows stay
        finite)."""
        named = dict(self.model.named_parameters())
        for edit in self.stepping:
            for name, copy in edit.copies.items():
                edit.outcome.max_overshoot = max(
                    edit.outcome.max_overshoot, overshoot(copy, self.bounds[name], self.eps)
                )
                if name in self.master_bounds:
                    round_master_into(edit.weights[name], copy, self.master_bounds[name])
            if not all(bool(torch.isfinite(w).all()) for w in edit.weights.values()):
                edit.fail("non-finite weights after an optimiser step")
                for name, copy in edit.copies.items():
                    copy.copy_(named[name])
                    edit.weights[name].copy_(named[name])
                continue
            for name, weight in edit.weights.items():
                clamp_into(weight, self.bounds[name])
        self.stepping = []


@contextmanager
def copies_in_forward(model: nn.Module, edits: Sequence[_Edit]) -> Iterator[None]:
    """Each edit's rows through its own copies of the weights it trains (see the module
    docstring); every other row through the model as it is."""
    by_module: dict[str, list[_Edit]] = {}
    for edit in edits:
        for name in edit.copies:
            owners = by_module.setdefault(name.rpartition(".")[0], [])
            if edit not in owners:
                owners.append(edit)
    modules = {path: get_module(model, path) for path in by_module}
    for module in modules.values():
        linear_out_in(module, module.weight)  # refuses other module types before any forward

    def replace(path: str, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        module = modules[path]
        pieces, at = [], 0
        for edit in by_module[path]:
            start, stop = edit.rows.start, edit.rows.stop
            if start > at:
                pieces.append(hidden[at:start])
            weight = edit.weights.get(f"{path}.weight", module.weight)
            bias = edit.weights.get(f"{path}.bias", module.bias)
            pieces.append(F.linear(x[start:stop], linear_out_in(module, weight), bias).to(hidden.dtype))
            at = stop
        if at < hidden.shape[0]:
            pieces.append(hidden[at:])
        return torch.cat(pieces)

    edits_by_path = {path: (lambda x, h, path=path: replace(path, x, h)) for path in modules}
    with edited_from_inputs(modules, edits_by_path):
        yield


def grouped_finetune(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    windows: Sequence[list[int]],
    hp: FTHParams,
) -> list[FinetuneOutcome | EditFailed]:
    """Finetune G edits (``requests[g]`` on the layers ``windows[g]``) as one batch; each
    comes back as its :class:`FinetuneOutcome` or, when it fails, its :class:`EditFailed`.
    The model's weights are not changed."""
    if hp.steps < 1:
        raise ValueError("FT needs steps >= 1")
    named = dict(model.named_parameters())
    device, pad = model_device(model), pad_token_id(model)
    batches = [
        build_batch(tokenizer, r, encode_target(tokenizer, r.prompt, r.target), pad_id=pad,
                    device=device)
        for r in requests
    ]
    edits, start = [], 0
    for request, window, batch in zip(requests, windows, batches, strict=True):
        names = finetuned_param_names(model, window, hp.params)
        weights = {n: named[n].detach().clone().requires_grad_(True) for n in names}
        copies = {
            n: w.detach().float().clone().requires_grad_(True) if is_half(w) else w
            for n, w in weights.items()
        }
        edits.append(_Edit(slice(start, start + batch.size), batch.n_rewrite, batch.n_target,
                           request.direction, weights, copies, FinetuneOutcome({})))
        start += batch.size
    batch = stacked_batches(batches, pad)
    module = GroupedFinetune(model, batch, edits, hp)
    lowest = min(min(w) for w in windows)
    was_training = model.training
    flags = {name: p.requires_grad for name, p in named.items()}
    for param in named.values():  # gradients reach the copies only
        param.requires_grad_(False)
    try:
        with copies_in_forward(model, edits):
            fit(module, model, batch, lowest, hp.steps)
    finally:
        model.train(was_training)
        for name, flag in flags.items():
            named[name].requires_grad_(flag)
    out: list[FinetuneOutcome | EditFailed] = []
    for edit in edits:
        if edit.failure is not None:
            out.append(edit.failure)
            continue
        edit.outcome.weights = {n: w.detach().clone() for n, w in edit.weights.items()}
        out.append(edit.outcome)
    return out


def finetune_group(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    edits: Sequence[GroupedEdit],
    covariance: object = None,
) -> list[tuple[FinetuneOutcome | EditFailed]]:
    """FT-1 / FT-5's ``batched_fit``: the edits of each hyperparameter setting finetuned as one
    batch (:func:`grouped_finetune`), each edit's outcome as the one-element ``vstars`` that
    :func:`locedit.editing.edited` hands to ``apply_finetune``."""
    out: list[tuple] = [()] * len(edits)
    batches: dict[str, list[tuple[int, EditRequest, list[int], FTHParams]]] = {}
    for index, edit in enumerate(edits):
        _, hparams, layers, _ = prepared(
            model, tokenizer, edit.method, edit.layer, edit.hparams, None, edit.co_requests
        )
        batches.setdefault(repr(hparams), []).append((index, edit.request, layers, hparams))
    with attention_without_cudnn():  # as EditMethod.run: bfloat16 on Hopper
        for members in batches.values():
            found = grouped_finetune(
                model, tokenizer, [m[1] for m in members], [m[2] for m in members], members[0][3]
            )
            for (index, *_), outcome in zip(members, found, strict=True):
                out[index] = (outcome,)
    return out
