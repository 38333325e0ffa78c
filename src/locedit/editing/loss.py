"""The edit objective (paper Sec. 5.2, App. A): target log-probabilities read only at the
positions that predict target tokens, and the loss in the problem's direction."""

from __future__ import annotations

import torch
from torch import nn

from locedit.data.records import Direction
from locedit.editing.batch import EditBatch
from locedit.editing.prefix import SplitBatch
from locedit.models.scoring import unembed


def _row_totals(
    log_probs: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    size: int,
    rewrite: torch.Tensor,
) -> torch.Tensor:
    """Summed log p(target token) per rewriting row from log-distributions at target positions."""
    picked = log_probs.gather(1, tokens[:, None])[:, 0]
    totals = torch.zeros(size, dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    return totals[rewrite]


def batch_target_log_probs(model: nn.Module, hidden: torch.Tensor, batch: EditBatch) -> torch.Tensor:
    """Summed log p(target) per rewriting row, unembedding only the predicting positions."""
    logits = unembed(model, hidden[batch.target_rows, batch.target_cols]).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return _row_totals(log_probs, batch.target_rows, batch.target_tokens, batch.size, batch.rewrite)


def objective(
    row_log_probs: torch.Tensor, n_target: int, direction: Direction
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean NLL per target token) for the problem's direction.

    Maximising minimises the NLL per target token averaged over rows (ROME's ``compute_v``);
    minimising (Fact Erasure) minimises exp(-NLL), the geometric-mean token probability, as
    the paper's code does.
    """
    nll = (-row_log_probs / n_target).mean()
    return (nll if direction == "maximize" else torch.exp(-nll)), nll


def split_log_probs(
    model: nn.Module, hidden: torch.Tensor, split: SplitBatch, with_kl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed log p(target) per rewriting row, and the KL rows' next-token log-distribution.

    The KL distribution is read at the lookup token (suffix position 0) of each KL row, as
    ROME does. Both come from one unembedding call: at a few dozen positions the cost is
    reading the vocabulary matrix, so one read instead of two halves it.
    """
    kl_rows = (
        split.kl_rows if with_kl else torch.zeros(0, dtype=torch.long, device=split.kl.device)
    )
    rows = torch.cat([split.target_rows, kl_rows])
    cols = torch.cat([split.target_cols, torch.zeros_like(kl_rows)])
    log_probs = torch.log_softmax(unembed(model, hidden[rows, cols]).float(), dim=-1)
    n_targets = int(split.target_rows.shape[0])
    totals = _row_totals(
        log_probs[:n_targets], split.target_rows, split.target_tokens, split.size, split.rewrite
    )
    return totals, (log_probs[n_targets:] if with_kl else None)
