"""Neighbourhood KL (NKL): CounterFact+'s specificity metric on the full next-token distribution.

Hoelscher-Obermaier, Persson, Kran, Konstas, Barez, "Detecting Edit Failures In Large Language
Models: An Improved Specificity Benchmark" (Findings of ACL 2023, arXiv 2305.17553). CounterFact+
prepends the edit, "{s r} {o_false}. ", to every neighbourhood prompt of CounterFact; NKL is the
KL divergence between the unedited and the edited model's next-token distributions at the last
position of such a prompt, averaged over the fact's neighbourhood prompts. Lower is better
(0: the edit left every neighbour's distribution unchanged).

What the authors' released code does (apartresearch/specificityplus), and our settings for it:

- prefix: ``f"{rewrite_prompt} {target_new}. " + neighbourhood_prompt``, tokenized as one
  string (experiments/py/eval_utils_counterfact.py, ``distracting_neighborhood_prompts``);
  ``prefix: edit``. ``prefix: none`` scores CounterFact's plain neighbourhood prompts (their
  "N" column beside "N+").
- direction: ``torch.nn.functional.kl_div(input=log P, target=log P*, log_target=True)`` with P
  the unedited and P* the edited model (experiments/analyze.py, ``get_case_df``), which is
  KL(P* || P) = sum_w P*(w) (log P*(w) - log P(w)); ``direction: post_pre``. ``pre_post`` is
  the other order, KL(P || P*).
- reduction: that call uses ``reduction="batchmean"`` on a 1-D vocabulary vector, which divides
  the sum by the vocabulary size |V| (consistent with their plots' NKL axis, 1e-7 to 5e-5);
  ``reduction: vocab_mean`` reproduces those numbers, ``sum`` (default) is the KL in nats.

The distributions are read in float32 (the logits are cast before the softmax) and the KL is
summed in float64, whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.models.scoring import next_token_log_probs

#: ``edit``: CounterFact+ (the edit prepended); ``none``: CounterFact's plain neighbour prompts.
PREFIXES = ("edit", "none")
#: ``post_pre``: KL(P* || P) as the authors' code computes it; ``pre_post``: KL(P || P*).
DIRECTIONS = ("post_pre", "pre_post")
#: ``sum``: the KL in nats; ``vocab_mean``: divided by |V| (torch's batchmean on one vector).
REDUCTIONS = ("sum", "vocab_mean")


@dataclass(frozen=True)
class NeighborhoodKLConfig:
    """``edit.neighborhood_kl`` (off by default: the default run's time is unchanged)."""

    enabled: bool = False
    prefix: str = "edit"
    direction: str = "post_pre"
    reduction: str = "sum"
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name, allowed in (
            ("prefix", PREFIXES),
            ("direction", DIRECTIONS),
            ("reduction", REDUCTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"edit.neighborhood_kl.{name} {getattr(self, name)!r} not among {allowed}"
                )
        if self.batch_size < 1:
            raise ValueError("edit.neighborhood_kl.batch_size must be >= 1")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> NeighborhoodKLConfig:
        cfg = dict(cfg or {})
        return cls(
            enabled=bool(cfg.get("enabled", False)),
            prefix=str(cfg.get("prefix", "edit")),
            direction=str(cfg.get("direction", "post_pre")),
            reduction=str(cfg.get("reduction", "sum")),
            batch_size=int(cfg.get("batch_size", 16)),
        )

    def key_content(self) -> dict[str, Any]:
        """What the values depend on (the batch size does not change them)."""
        content = asdict(self)
        content.pop("batch_size")
        return content


def edit_statement(record: FactRecord) -> str | None:
    """CounterFact+'s prefix: the rewrite prompt completed by the new object, then ". "."""
    if not record.target_new:
        return None
    return f"{record.prompt} {record.target_new}. "


def kl_prompts(
    tokenizer: PreTrainedTokenizerBase, record: FactRecord, prefix: str = "edit"
) -> list[tuple[int, ...]]:
    """Token ids of the neighbourhood prompts the KL is read on (prefixed and tokenized as one
    string, as the authors' code does); empty when the fact has none or lacks o_false."""
    if prefix not in PREFIXES:
        raise ValueError(f"prefix {prefix!r} not among {PREFIXES}")
    lead = edit_statement(record) if prefix == "edit" else ""
    if lead is None:
        return []
    return [tuple(tokenizer(lead + text)["input_ids"]) for text in record.neighborhood_prompts]


def next_token_distributions(
    model: nn.Module, prompts: Sequence[Sequence[int]], batch_size: int = 16
) -> torch.Tensor:
    """log P(w | prompt) over the whole vocabulary at each prompt's last position, float32 on
    the CPU: [n_prompts, vocab]. Batches are fixed by ``batch_size`` alone, so the same model
    gives bit-identical values before and after (an unedited model has KL exactly 0)."""
    return copied_next_token_distributions(model, prompts, batch_size, 1)[0]


def copied_next_token_distributions(
    model: nn.Module, prompts: Sequence[Sequence[int]], batch_size: int, copies: int
) -> torch.Tensor:
    """:func:`next_token_distributions` of ``copies`` copies, [copies, n_prompts, vocab]: each
    forward holds ``copies`` equal blocks of the same chunk (copy g in block g; see
    :func:`locedit.editing.deltas.weight_deltas_by_group`)."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        log_p = next_token_log_probs(model, chunk * copies).float().cpu()
        chunks.append(log_p.view(copies, len(chunk), -1))
    return torch.cat(chunks, 1) if chunks else torch.empty(copies, 0, 0, device="cpu")


def kl_divergences(
    log_pre: torch.Tensor,
    log_post: torch.Tensor,
    direction: str = "post_pre",
    reduction: str = "sum",
) -> torch.Tensor:
    """KL per prompt in float64: sum_w P_a(w) (log P_a(w) - log P_b(w)), with (a, b) = (post,
    pre) for ``post_pre`` and (pre, post) for ``pre_post``; divided by |V| for ``vocab_mean``."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} not among {DIRECTIONS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} not among {REDUCTIONS}")
    if log_pre.shape != log_post.shape:
        raise ValueError(
            f"distributions differ in shape: {tuple(log_pre.shape)} vs {tuple(log_post.shape)}"
        )
    pre, post = log_pre.double(), log_post.double()
    log_a, log_b = (post, pre) if direction == "post_pre" else (pre, post)
    # exp(-inf) * (-inf - x) would be nan: a zero-probability word contributes nothing
    terms = torch.where(log_a.isneginf(), torch.zeros_like(log_a), log_a.exp() * (log_a - log_b))
    kl = terms.sum(dim=-1)
    return kl / log_a.shape[-1] if reduction == "vocab_mean" else kl


def neighborhood_kl(
    log_pre: torch.Tensor, log_post: torch.Tensor, config: NeighborhoodKLConfig
) -> float:
    """NKL of one edit: the mean over the fact's neighbourhood prompts (NaN without any)."""
    if log_pre.numel() == 0:
        return math.nan
    return float(kl_divergences(log_pre, log_post, config.direction, config.reduction).mean())
