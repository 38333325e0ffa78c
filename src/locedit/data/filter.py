"""The known-fact filter of the paper (App. A): keep facts the model actually completes.

A fact is kept when o_true appears in the first 36 greedily generated tokens of its prompt.
Fact Erasure further needs p(o_true | s, r) >= 0.02, stored per fact as ``erasure_ok``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.models.device import model_device
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import TokenizationError, encode_prompt, encode_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilterConfig:
    max_new_tokens: int = 36
    batch_size: int = 8
    erasure_min_prob: float = 0.02
    max_facts: int | None = None
    #: False keeps facts the model does not complete (smoke tests on random models, or
    #: tracing arbitrary facts); the paper always filters.
    require_known: bool = True
    #: Also drop known facts with p(o_true | s, r) below this. ``None`` (the paper) keeps them;
    #: a small model often completes a fact only after a detour ("... the language of France,
    #: French") with p(o_true) near zero at the next token, where the tracing effect's
    #: denominator p_clean - p_noised vanishes and the analysis must drop the fact anyway.
    min_p_true: float | None = None


@dataclass
class FilterResult:
    kept: list[FactRecord]
    n_candidates: int
    n_known: int
    dropped: Counter = field(default_factory=Counter)
    #: Candidates whose completion was generated (the scan stops once max_facts are kept).
    n_scanned: int = 0

    @property
    def completion_accuracy(self) -> float:
        """Share of the scanned candidates whose greedy completion contains o_true."""
        return self.n_known / self.n_scanned if self.n_scanned else math.nan


def greedy_completions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 36,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations (text after the prompt), batched with left padding.

    Left padding keeps every prompt's last token at the end of the row, which decoder-only
    generation needs; the attention mask gives pad positions no weight.
    """
    original_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc="greedy completions", unit="batch", disable=not progress):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(model_device(model))
            with torch.no_grad():
                generated = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                    top_k=None,
                    top_p=None,
                    temperature=None,
                )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = original_side
    return out


def is_known(completion: str, target_true: str) -> bool:
    """o_true appears in the completion (App. A)."""
    return target_true.strip() in completion


def filter_known_facts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[FactRecord],
    config: FilterConfig,
    progress: bool = True,
) -> FilterResult:
    """Keep the facts the model knows, annotated with p(o_true|s,r) and the erasure flag.

    Records are scanned in order, one generation batch at a time, and the scan stops once
    ``max_facts`` facts are kept: greedy generation is the expensive part, so a default that
    keeps a handful of facts need not complete every candidate. Records never scanned are
    counted under "not scanned (max_facts reached)".
    """
    dropped: Counter = Counter()
    usable: list[tuple[FactRecord, list[int], list[int]]] = []
    for record in records:
        try:
            encoded = encode_prompt(tokenizer, record.prompt, record.subject)
            target_ids = encode_target(tokenizer, record.prompt, record.target_true)
            if record.target_new is not None:
                encode_target(tokenizer, record.prompt, record.target_new)
        except TokenizationError as err:
            dropped[f"tokenization: {err}"] += 1
            continue
        usable.append((record, encoded.input_ids, target_ids))

    kept: list[FactRecord] = []
    n_known = n_scanned = 0
    batch_size = max(1, config.batch_size)
    bar = tqdm(total=len(usable), desc="known-fact filter", unit="fact", disable=not progress)
    for start in range(0, len(usable), batch_size):
        if config.max_facts is not None and len(kept) >= config.max_facts:
            break
        chunk = usable[start : start + batch_size]
        completions = greedy_completions(
            model, tokenizer, [r.prompt for r, _, _ in chunk], config.max_new_tokens, batch_size, False
        )
        log_p = target_log_probs(model, [p for _, p, _ in chunk], [t for _, _, t in chunk], batch_size)
        for (record, _, _), completion, lp in zip(chunk, completions, log_p.tolist(), strict=True):
            n_scanned += 1
            known = is_known(completion, record.target_true)
            n_known += known
            p_true = math.exp(lp)
            reason = _drop_reason(known, p_true, len(kept), config)
            if reason:
                dropped[reason] += 1
                continue
            extra = {
                **record.extra,
                "completion": completion,
                "p_true": p_true,
                "erasure_ok": p_true >= config.erasure_min_prob,
                "known": known,
            }
            kept.append(replace(record, extra=extra))
        bar.update(len(chunk))
        bar.set_postfix(kept=len(kept))
    bar.close()
    if n_scanned < len(usable):
        dropped["not scanned (max_facts reached)"] += len(usable) - n_scanned
    return FilterResult(
        kept=kept, n_candidates=len(records), n_known=n_known, dropped=dropped, n_scanned=n_scanned
    )


def _drop_reason(known: bool, p_true: float, n_kept: int, config: FilterConfig) -> str | None:
    """Why a scanned fact is not kept, or ``None`` to keep it (checked in this order)."""
    if not known and config.require_known:
        return "o_true not in the greedy completion"
    if config.min_p_true is not None and p_true < config.min_p_true:
        return "p(o_true) below min_p_true"
    if config.max_facts is not None and n_kept >= config.max_facts:
        return "beyond max_facts"
    return None
