"""ROME's v* optimisation as the original ``compute_v`` runs it, for tests and the benchmark.

Every step forwards the whole model over every row and computes logits at every position,
then reads the target and KL log-probabilities from them. No prefix cache, no frozen lower
layers, no selective unembedding: the straightforward algorithm that
:func:`locedit.editing.vstar.optimise_vstar` must reproduce, and the baseline its speed is
measured against (``benchmarks/editing.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from locedit.data.records import Direction
from locedit.editing.batch import EditBatch
from locedit.editing.hparams import VStarHParams
from locedit.editing.loss import objective
from locedit.editing.vstar import clamped_step
from locedit.models.architecture import text_config
from locedit.models.hooks import edited_output


def optimise_vstar_reference(
    model: nn.Module,
    batch: EditBatch,
    module: nn.Module,
    hp: VStarHParams,
    direction: Direction = "maximize",
) -> torch.Tensor:
    """v* = init + delta after ``hp.v_steps`` full forward passes (the last only scores).

    Clean requests only (no noised subject): the benchmark and tests edit Error Injection facts.
    """
    if batch.noise is not None:
        raise ValueError("the reference v* handles clean requests only")
    device = batch.input_ids.device
    rows = torch.arange(batch.size, device=device)
    delta = torch.zeros(int(text_config(model).hidden_size), requires_grad=True, device=device)
    optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
    state: dict[str, torch.Tensor] = {}

    def add_delta(value: torch.Tensor) -> torch.Tensor:
        if "init" not in state:
            state["init"] = value[rows, batch.lookup].detach().clone()
        added = torch.zeros_like(value).index_put((rows, batch.lookup), delta.expand(batch.size, -1))
        return value + added

    kl_init: torch.Tensor | None = None
    use_kl = bool(hp.kl_factor) and bool(batch.kl.any())
    with edited_output(module, add_delta):
        for step in range(hp.v_steps):
            optimiser.zero_grad()
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            picked = log_probs[batch.target_rows, batch.target_cols, batch.target_tokens]
            totals = torch.zeros(batch.size, device=device).index_add(0, batch.target_rows, picked)
            loss, _ = objective(totals[batch.rewrite], batch.n_target, direction)
            init = state["init"][batch.bare].mean(0)
            if use_kl:
                kl_rows = torch.nonzero(batch.kl)[:, 0]
                current = log_probs[kl_rows, batch.lookup[kl_rows]]
                if kl_init is None:
                    kl_init = current.detach().clone()
                loss = loss + hp.kl_factor * torch.nn.functional.kl_div(
                    kl_init, current, log_target=True, reduction="batchmean"
                )
            loss = loss + hp.weight_decay * (delta.norm() / init.norm() ** 2)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"non-finite reference v* loss at step {step}")
            if hp.early_stop_loss is not None and float(loss.detach()) < hp.early_stop_loss:
                break
            if step == hp.v_steps - 1:
                break
            clamped_step(loss, optimiser, delta, hp.clamp_norm_factor * init.norm())
    return (state["init"][batch.bare].mean(0) + delta).detach()
