"""Symmetric token replacement (STR), the corruption Zhang & Nanda recommend for activation
patching ("Towards Best Practices of Activation Patching", ICLR 2024), as an alternative to
the paper's Gaussian subject noise (§3.2).

The corrupted input of sample j is the fact's prompt with the subject's tokens swapped for
those of another subject of the *same token length* from the run's facts; everything else
(context tokens, teacher-forced object tokens, the restorations) is Causal Tracing as today.

The swap is passed to tracing as its "noise": the difference of the embedding-module outputs
of the replacement and the clean prompt at the subject positions. Added to the clean
embedding output there (:func:`locedit.models.noise.noised_subject`), it gives the
replacement's own embedding output (to float rounding), whatever the module does after the
lookup (Gemma's scaled embedding) and whatever the model adds after it (GPT-2's position
embeddings, which are equal for equal positions).

The pool is the prepared data set's subjects by default (``trace.str_pool``). The draw for a
fact depends only on the run seed, the fact (id and text), the pool and the
tokenizer: candidates are ranked by a hash of (seed, fact id, candidate subject), so facts
can be processed in any order and adding a subject to the pool never reshuffles the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.models.architecture import embedding_module
from locedit.models.tokens import TokenizationError, encode_prompt
from locedit.tracing.patching import SkipFact, TracingInput
from locedit.tracing.results import TraceResult

log = logging.getLogger(__name__)

#: The corruptions of Causal Tracing (params ``trace.corruption``).
CORRUPTIONS: tuple[str, ...] = ("gaussian", "str")

#: The ``method`` value of STR rows in outputs/trace/effects.parquet.
STR_METHOD = "tracing_str"


@dataclass(frozen=True)
class PoolSubject:
    """One candidate replacement: a subject string and the (first, by id) fact it came from."""

    subject: str
    fact_id: str


class SubjectPool:
    """The candidate replacement subjects: the distinct subjects of a set of facts (the stage
    uses the prepared data set, outputs/prepare, or the traced facts, outputs/filter), sorted
    by string.

    Token counts depend on what precedes a subject (GPT-2 marks a leading space, a prompt's
    first word has none), so candidates are grouped by their token count after the character
    that precedes the fact's subject; every grouping is computed once per such character.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        subjects: Sequence[PoolSubject],
        source: str = "the traced facts",
    ):
        self.tokenizer = tokenizer
        self.source = source
        self.subjects = tuple(sorted(subjects, key=lambda s: s.subject))
        self._by_length: dict[str, dict[int, list[PoolSubject]]] = {}

    @classmethod
    def from_records(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        records: Iterable[FactRecord],
        source: str = "the traced facts",
    ) -> SubjectPool:
        """Distinct non-empty subject strings; the first fact id in sorted order names each."""
        chosen: dict[str, PoolSubject] = {}
        for record in sorted(records, key=lambda r: r.fact_id):
            if record.subject and record.subject.strip() and record.subject not in chosen:
                chosen[record.subject] = PoolSubject(record.subject, record.fact_id)
        return cls(tokenizer, list(chosen.values()), source)

    def __len__(self) -> int:
        return len(self.subjects)

    def of_length(self, n_tokens: int, before: str) -> list[PoolSubject]:
        """Subjects that take ``n_tokens`` tokens right after the text ``before`` (one
        character, or empty at the start of a prompt); a pre-filter, the swap is checked."""
        if before not in self._by_length:
            groups: dict[int, list[PoolSubject]] = {}
            for candidate in self.subjects:
                try:
                    enc = encode_prompt(
                        self.tokenizer, before + candidate.subject, candidate.subject
                    )
                except TokenizationError:
                    continue
                groups.setdefault(enc.subject_end - enc.subject_start, []).append(candidate)
            self._by_length[before] = groups
        return list(self._by_length[before].get(n_tokens, []))

    def digest(self) -> str:
        """A short content hash of the pool (stored with the replacements)."""
        text = "\n".join(f"{s.subject}\t{s.fact_id}" for s in self.subjects)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "n_subjects": len(self),
            "digest": self.digest(),
        }


@dataclass(frozen=True)
class Replacements:
    """The subjects that replace one fact's subject, one per corruption sample."""

    fact_id: str
    subjects: tuple[str, ...]
    source_fact_ids: tuple[str, ...]
    replaced_ids: tuple[tuple[int, ...], ...]  # each sample's full input ids
    cycled: bool  # fewer eligible subjects than samples: the draw repeats them

    @property
    def n_distinct(self) -> int:
        return len(set(self.subjects))

    def to_json(self) -> dict:
        out = asdict(self)
        del out["replaced_ids"]
        out["n_distinct"] = self.n_distinct
        return out


def _rank(seed: int, fact_id: str, subject: str) -> bytes:
    return hashlib.sha256(f"str:{seed}:{fact_id}:{subject}".encode()).digest()


def _swapped_ids(
    tokenizer: PreTrainedTokenizerBase, fact: FactRecord, inp: TracingInput, candidate: str
) -> tuple[int, ...] | None:
    """The fact's input ids with the subject swapped for ``candidate``, if the swap changes
    only the subject tokens and keeps their number (else None)."""
    start = fact.prompt.find(fact.subject)
    prompt = fact.prompt[:start] + candidate + fact.prompt[start + len(fact.subject) :]
    try:
        enc = encode_prompt(tokenizer, prompt, candidate)
    except TokenizationError:
        return None
    ids = list(enc.input_ids)
    clean = list(inp.input_ids[: inp.n_prompt])
    s, e = inp.subject_start, inp.subject_end
    if (enc.subject_start, enc.subject_end) != (s, e) or len(ids) != len(clean):
        return None
    if ids[:s] != clean[:s] or ids[e:] != clean[e:]:
        return None
    return tuple(ids + list(inp.input_ids[inp.n_prompt :]))


def draw_replacements(
    tokenizer: PreTrainedTokenizerBase,
    fact: FactRecord,
    inp: TracingInput,
    pool: SubjectPool,
    n_samples: int,
    seed: int,
) -> Replacements:
    """``n_samples`` replacement subjects for ``fact``: same token count, never the fact's own
    subject string, distinct while the eligible candidates last (then cycled in rank order).

    Raises :class:`SkipFact` when no candidate fits.
    """
    n = inp.n_subject
    own = fact.subject.strip()
    at = fact.prompt.find(fact.subject)
    before = fact.prompt[at - 1 : at] if at > 0 else ""
    candidates = [c for c in pool.of_length(n, before) if c.subject.strip() != own]
    candidates.sort(key=lambda c: _rank(seed, fact.fact_id, c.subject))
    chosen: list[tuple[PoolSubject, tuple[int, ...]]] = []
    for candidate in candidates:
        ids = _swapped_ids(tokenizer, fact, inp, candidate.subject)
        if ids is not None:
            chosen.append((candidate, ids))
            if len(chosen) == n_samples:
                break
    if not chosen:
        raise SkipFact(
            f"STR: no replacement subject of {n} token(s) among {len(pool)} pool subjects "
            f"({len(candidates)} of that length) swaps cleanly into the prompt"
        )
    # Fewer eligible than samples: every candidate was checked, cycle through the eligible.
    picked = [chosen[i % len(chosen)] for i in range(n_samples)]
    if len(chosen) < n_samples:
        log.info(
            "STR: fact %s has %d eligible replacement(s) for %d samples (drawn with replacement)",
            fact.fact_id,
            len(chosen),
            n_samples,
        )
    return Replacements(
        fact_id=fact.fact_id,
        subjects=tuple(c.subject for c, _ in picked),
        source_fact_ids=tuple(c.fact_id for c, _ in picked),
        replaced_ids=tuple(ids for _, ids in picked),
        cycled=len(chosen) < n_samples,
    )


@torch.no_grad()
def replacement_noise(
    model: nn.Module, inp: TracingInput, replaced_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """[n_samples, n_subject, d_model]: embedding-module output of each replaced input minus
    that of the clean input, at the subject positions (the STR "noise")."""
    embed = embedding_module(model)
    device = embed.weight.device
    clean = embed(torch.tensor([inp.input_ids], device=device))
    replaced = embed(torch.tensor([list(ids) for ids in replaced_ids], device=device))
    span = slice(inp.subject_start, inp.subject_end)
    return replaced[:, span] - clean[:, span]


@dataclass
class StrTraceResult(TraceResult):
    """Causal Tracing with symmetric token replacement instead of noise: sample j replaces the
    subject by ``replacements[j]`` (a pool subject of the same token length, from fact
    ``replacement_fact_ids[j]``); ``p_noised`` is the mean of p(o_true | s_replaced, r) and
    ``sigma`` is NaN. Kept out of :mod:`locedit.tracing.results` so that the Gaussian path's
    code version, and with it its cache keys, does not change."""

    replacements: tuple[str, ...] = ()
    replacement_fact_ids: tuple[str, ...] = ()
    method: str = field(default=STR_METHOD, init=False)

    def meta(self) -> dict:
        return {
            **super().meta(),
            "replacements": list(self.replacements),
            "replacement_fact_ids": list(self.replacement_fact_ids),
        }

    @classmethod
    def from_stored(
        cls, meta: dict, arrays: dict[str, np.ndarray], min_denominator: float
    ) -> StrTraceResult:
        base = TraceResult.from_stored(meta, arrays, min_denominator)
        return cls.from_trace(base, meta["replacements"], meta["replacement_fact_ids"])

    @classmethod
    def from_trace(
        cls,
        result: TraceResult,
        replacements: Sequence[str],
        replacement_fact_ids: Sequence[str],
    ) -> StrTraceResult:
        """The same numbers, labelled as STR with the subjects that produced them."""
        fields_ = {f.name: getattr(result, f.name) for f in fields(TraceResult) if f.init}
        return cls(
            **{**fields_, "sigma": float("nan")},
            replacements=tuple(replacements),
            replacement_fact_ids=tuple(replacement_fact_ids),
        )


def load_str_result(path: Path, min_denominator: float) -> StrTraceResult:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {k: data[k] for k in data.files if k != "meta"}
    if meta.get("method") != STR_METHOD:
        raise ValueError(f"{path} is not an STR trace result")
    return StrTraceResult.from_stored(meta, arrays, min_denominator)
