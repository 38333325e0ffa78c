"""The v* (ROME) / z* (MEMIT) optimisation: a vector added at the subject's last token.

ROME's ``compute_v``: Adam on ``delta`` added to a module's output at every row's lookup
token, minimising the target NLL (or, for Fact Erasure, its probability) + kl_factor x
KL(edited || unedited) on "{subject} is a" + weight_decay x ||delta|| / ||v_init||^2, with
``delta`` clamped to clamp_norm_factor x ||v_init|| after every step. As in the original, the
last of ``v_steps`` forward passes only reports the final loss. ``v_lr_relative`` scales the
step to the size of v_init (models whose residual norms dwarf GPT-J's), ``early_stop_prob``
stops once the target is likely enough.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from locedit.data.records import Direction
from locedit.editing.batch import EditBatch
from locedit.editing.forward import added_at
from locedit.editing.hparams import VStarHParams
from locedit.editing.loss import objective, split_log_probs
from locedit.editing.prefix import PrefixCachedForward, split_batch
from locedit.editing.types import EditFailed
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
    with torch.no_grad():
        norm = delta.norm()
        outside = norm > max_norm
        delta.mul_(torch.where(outside, max_norm / norm, torch.ones_like(norm)))
        return outside & (max_norm > 0) & (delta.norm() == 0)


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
    d_model = int(model.config.hidden_size)
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
            nll_loss, nll = objective(row_log_probs, split.n_target, direction)
            loss = nll_loss
            init = _at_least_float32(state["init"][split.bare]).mean(0)
            if use_kl:
                if kl_init is None:
                    kl_init = current.detach().clone()
                loss = loss + hp.kl_factor * torch.nn.functional.kl_div(
                    kl_init, current, log_target=True, reduction="batchmean"
                )
            loss = loss + hp.weight_decay * (delta.norm() / init.norm() ** 2)
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
            if hp.early_stop_loss is not None and loss_value < hp.early_stop_loss:
                break
            if (
                hp.early_stop_prob is not None
                and direction == "maximize"
                and math.exp(-nll_value) >= hp.early_stop_prob
            ):
                break
            if step == hp.v_steps - 1:
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
