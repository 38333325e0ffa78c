"""The v* (ROME) / z* (MEMIT) optimisation: a vector added at the subject's last token.

ROME's ``compute_v``: Adam on ``delta`` added to a module's output at every row's lookup
token, minimising the target NLL (or, for Fact Erasure, its probability) + kl_factor x
KL(edited || unedited) on "{subject} is a" + weight_decay x ||delta|| / ||v_init||^2, with
``delta`` clamped to clamp_norm_factor x ||v_init|| after every step. As in the original, the
last of ``v_steps`` forward passes only reports the final loss. ``v_lr_relative`` scales the
step to the size of v_init (models whose residual norms dwarf GPT-J's), ``early_stop_prob``
stops once the target is likely enough.

:func:`optimise_vstars` runs independent edits' optimisations as one batch, each equal to its
own :func:`optimise_vstar` run (the reference) up to rounding (issue 28).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from locedit.data.records import Direction
from locedit.editing.batch import EditBatch
from locedit.editing.forward import added_at, added_per_group
from locedit.editing.hparams import VStarHParams
from locedit.editing.loss import objective, split_log_probs
from locedit.editing.prefix import PrefixCachedForward, merge_splits, split_batch
from locedit.editing.types import EditFailed
from locedit.models.architecture import text_config
from locedit.models.hooks import frozen_layers
from locedit.models.scoring import pad_token_id

log = logging.getLogger(__name__)


@dataclass
class VStar:
    """The optimised vector and how the optimisation went."""

    init: torch.Tensor  # unedited module output at the prompt's lookup token
    delta: torch.Tensor
    steps: int
    loss_first: float
    loss_last: float
    nll_first: float
    nll_last: float
    zeroed_steps: int = 0
    objective_first: float = float("nan")
    objective_last: float = float("nan")

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta

    def diagnostics(self, prefix: str = "v") -> dict[str, float]:
        return {
            f"{prefix}_steps": float(self.steps),
            f"{prefix}_loss_first": self.loss_first,
            f"{prefix}_loss_last": self.loss_last,
            f"{prefix}_target_prob_first": math.exp(-self.nll_first),
            f"{prefix}_target_prob_last": math.exp(-self.nll_last),
            f"{prefix}_delta_norm": float(self.delta.norm()),
            f"{prefix}_init_norm": float(self.init.norm()),
            f"{prefix}_zeroed_steps": float(self.zeroed_steps),
        }

    def flags(self, prefix: str = "v") -> list[str]:
        """``{prefix}_step_zeroed``: the clamp wiped a step out (its norm overflowed, e.g. a huge
        learning rate), so the edit uses no or less of the optimised vector than it seems;
        ``{prefix}_no_progress``: the optimisation ran but did not move the target probability
        in the problem's direction."""
        flags = []
        if self.zeroed_steps or (self.steps > 1 and float(self.delta.norm()) == 0.0):
            flags.append(f"{prefix}_step_zeroed")
        if self.steps > 1 and not self.objective_last < self.objective_first:
            flags.append(f"{prefix}_no_progress")
        return flags


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16/float16 values in float32: ||v_init|| sets the clamp radius, the weight-decay
    scale and the relative step, and bfloat16 would round each of them by up to 0.4%."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def clamped_step(
    loss: torch.Tensor, optimiser: torch.optim.Optimizer, delta: torch.Tensor, max_norm: torch.Tensor
) -> torch.Tensor:
    """One Adam step on ``delta``, then back onto the L2 ball of radius ``max_norm`` (ROME).

    Returns (as a 0-dim tensor: no wait for the GPU) whether the clamp zeroed ``delta`` (a step
    so large that its norm overflowed: ``max_norm / inf`` is 0), which the caller flags instead
    of reporting an ``ok`` edit. Inside the ball ``delta`` is multiplied by exactly 1.
    """
    loss.backward()
    optimiser.step()
    return clamp_to_ball(delta, max_norm)


def clamp_to_ball(delta: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """``delta`` back onto the L2 ball of radius ``max_norm``, in place (multiplied by exactly 1
    inside it); returns, as a 0-dim tensor, whether that zeroed it (see :func:`clamped_step`)."""
    with torch.no_grad():
        norm = delta.norm()
        outside = norm > max_norm
        delta.mul_(torch.where(outside, max_norm / norm, torch.ones_like(norm)))
        return outside & (max_norm > 0) & (delta.norm() == 0)


def step_loss(
    row_log_probs: torch.Tensor,
    n_target: int,
    direction: Direction,
    hp: VStarHParams,
    delta: torch.Tensor,
    init: torch.Tensor,
    kl: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, NLL per target token, the direction's objective) of one v* step: the objective
    + kl_factor x KL(kl_init as input, current as target; ROME's order) + weight_decay x
    ||delta|| / ||v_init||^2. ``kl`` is (kl_init, current) or None without the KL term."""
    nll_loss, nll = objective(row_log_probs, n_target, direction)
    loss = nll_loss
    if kl is not None:
        loss = loss + hp.kl_factor * torch.nn.functional.kl_div(
            kl[0], kl[1], log_target=True, reduction="batchmean"
        )
    loss = loss + hp.weight_decay * (delta.norm() / init.norm() ** 2)
    return loss, nll, nll_loss


def stops(hp: VStarHParams, direction: Direction, step: int, loss: float, nll: float) -> bool:
    """Whether the optimisation ends after measuring ``step`` (no update follows): an early
    stop on the loss or on p(target), or the last of ``v_steps`` forwards."""
    if hp.early_stop_loss is not None and loss < hp.early_stop_loss:
        return True
    if (
        hp.early_stop_prob is not None
        and direction == "maximize"
        and math.exp(-nll) >= hp.early_stop_prob
    ):
        return True
    return step == hp.v_steps - 1


def optimise_vstar(
    model: nn.Module,
    batch: EditBatch,
    module: nn.Module,
    n_frozen: int,
    hp: VStarHParams,
    direction: Direction,
    method: str,
) -> VStar:
    """Optimise the vector added to ``module``'s output at the lookup tokens.

    Each step recomputes only the suffix of every row (lookup token onwards) in the layers from
    ``n_frozen`` on: the prefix's keys and values and the lower layers' outputs are cached.
    """
    d_model = int(text_config(model).hidden_size)
    if hp.v_steps < 1:
        raise ValueError(f"{method} needs v_steps >= 1")
    split = split_batch(batch, pad_token_id(model))
    forward = PrefixCachedForward(model, split)
    # delta and the loss stay float32 whatever the weights' dtype (bfloat16/float16 models).
    device = split.suffix_ids.device
    lookup = torch.zeros(split.size, dtype=torch.long, device=device)
    delta = torch.zeros(d_model, requires_grad=True, device=device, dtype=torch.float32)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init: torch.Tensor | None = None
    first: tuple[float, float, float] | None = None
    loss_value = nll_value = float("nan")
    steps = 0
    zeroed = torch.zeros((), dtype=torch.long, device=device)
    width = int(split.suffix_ids.shape[1])
    use_kl = bool(hp.kl_factor) and bool(split.kl.any())
    with frozen_layers(model, forward, n_frozen), added_at(module, lookup, width, delta) as state:
        for step in range(hp.v_steps):
            optimiser.zero_grad()
            hidden = forward()
            row_log_probs, current = split_log_probs(model, hidden, split, use_kl)
            init = _at_least_float32(state["init"][split.bare]).mean(0)
            if use_kl and kl_init is None:
                kl_init = current.detach().clone()
            loss, nll, nll_loss = step_loss(
                row_log_probs, split.n_target, direction, hp, delta, init,
                (kl_init, current) if use_kl else None,
            )
            if step == 0 and hp.v_lr_relative is not None:
                for group in optimiser.param_groups:
                    group["lr"] = hp.v_lr_relative * float(init.norm()) / math.sqrt(d_model)
            # One read from the device per step: the losses, and whether the last step's delta
            # is finite (this forward used it, so a non-finite one is caught before its use).
            loss_value, nll_value, objective_value, finite = torch.stack([
                loss.detach(), nll.detach(), nll_loss.detach(),
                torch.isfinite(delta).all().to(loss.dtype),
            ]).tolist()
            if not finite:
                raise EditFailed(method, f"non-finite v* delta after step {step - 1}")
            if not (math.isfinite(loss_value) and math.isfinite(nll_value)):
                raise EditFailed(method, f"non-finite v* loss {loss_value} at step {step}")
            if first is None:
                first = (loss_value, nll_value, objective_value)
            log.debug(
                "v* step %d: loss %.4f, p(target) %.4f", step, loss_value, math.exp(-nll_value)
            )
            steps = step + 1
            if stops(hp, direction, step, loss_value, nll_value):
                break
            zeroed += clamped_step(loss, optimiser, delta, hp.clamp_norm_factor * init.norm())
    assert first is not None
    return VStar(
        init=_at_least_float32(state["init"][split.bare]).mean(0).detach(),
        delta=delta.detach().clone(),
        steps=steps,
        loss_first=first[0],
        loss_last=loss_value,
        nll_first=first[1],
        nll_last=nll_value,
        zeroed_steps=int(zeroed),
        objective_first=first[2],
        objective_last=objective_value,
    )


@dataclass(frozen=True)
class VStarJob:
    """One v*/z* optimisation of a batched run (:func:`optimise_vstars`): what
    :func:`optimise_vstar` takes for one edit."""

    batch: EditBatch
    module: nn.Module
    n_frozen: int
    hparams: VStarHParams
    direction: Direction
    method: str


@dataclass
class _Group:
    """Bookkeeping of one job inside :func:`optimise_vstars`."""

    job: VStarJob
    rewrite: torch.Tensor  # its rewriting rows, as indices into the rewriting rows' totals
    kl: torch.Tensor  # its KL rows, as indices into the KL rows' distributions
    bare: torch.Tensor  # its bare-prompt rows
    n_target: int
    use_kl: bool
    kl_init: torch.Tensor | None = None
    first: tuple[float, float, float] | None = None
    last: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    steps: int = 0
    running: bool = True
    failure: EditFailed | None = None


def given_vstar(edit, index: int) -> VStar | None:
    """The ``index``-th v*/z* an :class:`~locedit.editing.types.EditCall` brings along (a
    batched run's), None when it brings none; a failed one raises its :class:`EditFailed`."""
    if not edit.vstars:
        return None
    found = edit.vstars[index]
    if isinstance(found, EditFailed):
        raise found
    return found


def optimise_vstars(model: nn.Module, jobs: list[VStarJob]) -> list[VStar | EditFailed]:
    """:func:`optimise_vstar` for independent jobs at once, each equal to its own run.

    The jobs' rows form one batch (prefixes computed once, layers below the lowest job's
    ``n_frozen`` replayed); each job's delta is added at its own module's output at its own
    rows' lookup tokens (:func:`~locedit.editing.forward.added_per_group`). Every job has its
    own loss (summed for one backward: rows are independent, so each delta gets its own
    job's gradient), its own Adam parameter group (Adam is elementwise with a step count per
    tensor, so this is G separate optimisers), its own clamp, learning rate and stop. A job
    that stops (early stop, last step, non-finite) drops out of the sum and gets no gradient,
    so Adam leaves it and its state untouched from then on. A non-finite job comes back as
    its :class:`EditFailed`; the others finish.
    """
    if not jobs:
        return []
    for job in jobs:
        if job.hparams.v_steps < 1:
            raise ValueError(f"{job.method} needs v_steps >= 1")
    d_model = int(text_config(model).hidden_size)
    pad = pad_token_id(model)
    splits = [split_batch(job.batch, pad) for job in jobs]
    merged, _ = merge_splits(splits, pad)
    device = merged.suffix_ids.device
    row_group = torch.cat(
        [torch.full((s.size,), g, dtype=torch.long, device=device) for g, s in enumerate(splits)]
    )
    groups = []
    kl_rows = torch.nonzero(merged.kl)[:, 0]
    rewrite_rows = torch.nonzero(merged.rewrite)[:, 0]
    for g, (job, split) in enumerate(zip(jobs, splits, strict=True)):
        mine = row_group == g
        groups.append(
            _Group(
                job,
                rewrite=torch.nonzero(mine[rewrite_rows])[:, 0],
                kl=torch.nonzero(mine[kl_rows])[:, 0],
                bare=torch.nonzero(mine & merged.bare)[:, 0],
                n_target=split.n_target,
                use_kl=bool(job.hparams.kl_factor) and bool(split.kl.any()),
            )
        )
    with_kl = any(group.use_kl for group in groups)
    forward = PrefixCachedForward(model, merged)
    deltas = [
        torch.zeros(d_model, requires_grad=True, device=device, dtype=torch.float32)
        for _ in jobs
    ]
    optimiser = torch.optim.Adam([{"params": [d], "lr": job.hparams.v_lr}
                                  for d, job in zip(deltas, jobs, strict=True)])
    zeroed = torch.zeros(len(jobs), dtype=torch.long, device=device)
    n_frozen = min(job.n_frozen for job in jobs)
    modules = [job.module for job in jobs]
    with (
        frozen_layers(model, forward, n_frozen),
        added_per_group(modules, row_group, lambda: torch.stack(deltas)) as state,
    ):
        for step in range(max(job.hparams.v_steps for job in jobs)):
            active = [g for g, group in enumerate(groups) if group.running]
            if not active:
                break
            optimiser.zero_grad()
            hidden = forward()
            row_log_probs, current = split_log_probs(model, hidden, merged, with_kl)
            losses, values, inits = {}, [], {}
            for g in active:
                group, hp = groups[g], groups[g].job.hparams
                inits[g] = init = _at_least_float32(state["init"][group.bare]).mean(0)
                kl = None
                if group.use_kl:
                    mine = current[group.kl]
                    if group.kl_init is None:
                        group.kl_init = mine.detach().clone()
                    kl = (group.kl_init, mine)
                loss, nll, nll_loss = step_loss(
                    row_log_probs[group.rewrite], group.n_target, group.job.direction, hp,
                    deltas[g], init, kl,
                )
                if step == 0 and hp.v_lr_relative is not None:
                    optimiser.param_groups[g]["lr"] = (
                        hp.v_lr_relative * float(init.norm()) / math.sqrt(d_model)
                    )
                losses[g] = loss
                values.append(torch.stack([loss, nll, nll_loss]).detach())
            updated = []
            for g, (loss_value, nll_value, objective_value) in zip(
                active, torch.stack(values).tolist(), strict=True
            ):
                group = groups[g]
                if not (math.isfinite(loss_value) and math.isfinite(nll_value)):
                    group.running = False
                    group.failure = EditFailed(
                        group.job.method, f"non-finite v* loss {loss_value} at step {step}"
                    )
                    continue
                if group.first is None:
                    group.first = (loss_value, nll_value, objective_value)
                group.last = (loss_value, nll_value, objective_value)
                group.steps = step + 1
                if stops(group.job.hparams, group.job.direction, step, loss_value, nll_value):
                    group.running = False
                else:
                    updated.append(g)
            if not updated:
                continue
            torch.stack([losses[g] for g in updated]).sum().backward()
            for g, delta in enumerate(deltas):
                if g not in updated:
                    delta.grad = None  # Adam skips it: value and state stay as they are
            optimiser.step()
            finite = []
            with torch.no_grad():
                for g in updated:
                    max_norm = groups[g].job.hparams.clamp_norm_factor * inits[g].norm()
                    zeroed[g] += clamp_to_ball(deltas[g], max_norm)
                    finite.append(torch.isfinite(deltas[g]).all())
            for g, ok in zip(updated, torch.stack(finite).tolist(), strict=True):
                if not ok:
                    groups[g].running = False
                    groups[g].failure = EditFailed(
                        groups[g].job.method, f"non-finite v* delta after step {step}"
                    )
    results: list[VStar | EditFailed] = []
    for g, (group, n_zeroed) in enumerate(zip(groups, zeroed.tolist(), strict=True)):
        if group.failure is not None:
            results.append(group.failure)
            continue
        assert group.first is not None
        results.append(
            VStar(
                init=_at_least_float32(state["init"][group.bare]).mean(0).detach(),
                delta=deltas[g].detach().clone(),
                steps=group.steps,
                loss_first=group.first[0],
                loss_last=group.last[0],
                nll_first=group.first[1],
                nll_last=group.last[1],
                zeroed_steps=int(n_zeroed),
                objective_first=group.first[2],
                objective_last=group.last[2],
            )
        )
    return results
