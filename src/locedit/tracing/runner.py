"""Trace a list of facts with caching, progress and skip reasons; build the tidy table."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.data.tables import EFFECT_TABLE_COLUMNS
from locedit.tracing.cache import ResultCache, str_tracing_key, tracing_key, zeroing_key
from locedit.tracing.causal_trace import trace_fact_many, trace_fact_reference
from locedit.tracing.patching import KINDS, SkipFact, encode_fact
from locedit.tracing.replacement import (
    CORRUPTIONS,
    Replacements,
    StrTraceResult,
    SubjectPool,
    draw_replacements,
    replacement_noise,
)
from locedit.tracing.results import TraceResult, ZeroingResult
from locedit.tracing.zeroing import zero_fact

log = logging.getLogger(__name__)

#: Sources of the STR pool: the prepared data set's subjects (outputs/prepare, a superset of the
#: traced facts) or only the traced facts' (outputs/filter).
STR_POOLS = ("prepare", "filter")

#: Columns of outputs/trace/effects.parquet, in order.
TABLE_COLUMNS = list(EFFECT_TABLE_COLUMNS)


@dataclass(frozen=True)
class TraceSettings:
    """The ``trace`` params group as typed data (defaults live in conf/trace/default.yaml)."""

    kinds: tuple[str, ...] = ("mlp",)
    windows: tuple[int, ...] = (5,)
    noise_samples: int = 10
    min_denominator: float = 0.01
    zeroing: bool = True
    fast: bool = True
    corruption: tuple[str, ...] = ("gaussian",)
    str_pool: str = "prepare"  # where STR replacement subjects come from: prepare | filter

    def __post_init__(self) -> None:
        if self.str_pool not in STR_POOLS:
            raise ValueError(
                f"trace.str_pool must be one of {list(STR_POOLS)}, got {self.str_pool!r}"
            )
        object.__setattr__(self, "corruption", parse_corruption(self.corruption))
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"trace.kinds has unknown kinds {bad}; choose from {list(KINDS)}")
        if not self.windows or any(int(w) < 1 for w in self.windows):
            raise ValueError(f"trace.windows must be positive integers, got {list(self.windows)}")
        if self.noise_samples < 1:
            raise ValueError("trace.noise_samples must be >= 1")

    @classmethod
    def from_config(cls, cfg: Mapping) -> TraceSettings:
        raw = cfg.get("windows", (5,))
        windows = [raw] if isinstance(raw, int | str) else list(raw)
        if any(isinstance(w, bool) or not isinstance(w, int) for w in windows):
            raise ValueError(f"trace.windows must be positive integers, got {windows}")
        return cls(
            kinds=tuple(str(k) for k in cfg.get("kinds", ("mlp",))),
            windows=tuple(windows),
            noise_samples=int(cfg.get("noise_samples", 10)),
            min_denominator=float(cfg.get("min_denominator", 0.01)),
            zeroing=bool(cfg.get("zeroing", True)),
            fast=bool(cfg.get("fast", True)),
            corruption=parse_corruption(cfg.get("corruption", "gaussian")),
            str_pool=str(cfg.get("str_pool", "prepare")),
        )

    @property
    def uses_gaussian(self) -> bool:
        return "gaussian" in self.corruption

    @property
    def uses_str(self) -> bool:
        return "str" in self.corruption


def parse_corruption(value) -> tuple[str, ...]:
    """``trace.corruption``: one name or a list (``[gaussian, str]`` traces both), in the
    canonical order of :data:`CORRUPTIONS`, duplicates dropped."""
    names = [value] if isinstance(value, str) else [str(v) for v in value]
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise ValueError(
            f"trace.corruption must be one or more of {list(CORRUPTIONS)}, got {names}"
        )
    return tuple(c for c in CORRUPTIONS if c in names)


@dataclass
class TraceRun:
    """Everything one call of :func:`trace_records` produced."""

    tracing: list[TraceResult] = field(default_factory=list)
    zeroing: list[ZeroingResult] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    replacements: dict[str, Replacements] = field(default_factory=dict)  # STR draw per fact
    n_computed: int = 0
    n_cached: int = 0
    seconds: float = 0.0

    def table(self) -> pd.DataFrame:
        """One row per (fact_id, method, kind, window, layer)."""
        rows = [row for result in [*self.tracing, *self.zeroing] for row in result.rows()]
        frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return frame.astype(
            {
                "fact_id": str,
                "method": str,
                "kind": str,
                "window": "int64",
                "layer": "int64",
                "effect_max": "float64",
                "effect_last_subject": "float64",
                "argmax_token": "int64",
                "p_clean": "float64",
                "p_noised": "float64",
                "low_denominator": bool,
            }
        )


def trace_records(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[FactRecord],
    settings: TraceSettings,
    *,
    sigma: float,
    seed: int,
    fingerprint: str,
    cache: ResultCache | None = None,
    on_fact: Callable[[FactRecord, bool], None] | None = None,
    progress: bool = True,
    pool: SubjectPool | None = None,
) -> TraceRun:
    """Trace (and zero) every fact, reusing cached results; skip untraceable facts with a reason.

    With ``settings.corruption`` including ``str``, ``pool`` (default: the subjects of
    ``records``) supplies the replacement subjects; a fact with no replacement of its subject's
    token length is skipped for STR only (a ``skipped`` entry with ``"corruption": "str"``);
    its Gaussian tracing and zeroing still run.

    ``on_fact(fact, computed)`` runs after each fact (``computed`` is False when everything
    came from the cache); each (fact, kind, window) result is cached as soon as it exists, so
    a run killed at any point loses at most the fact in progress.
    """
    run = TraceRun()
    if settings.uses_str and pool is None:
        pool = SubjectPool.from_records(tokenizer, records)
    start = time.perf_counter()
    bar = tqdm(records, unit="fact", desc="trace", disable=not progress)
    for fact in bar:
        try:
            computed = _trace_one(
                model, tokenizer, fact, settings, sigma, seed, fingerprint, cache, run, pool
            )
        except SkipFact as err:
            log.warning("skipping fact %s: %s", fact.fact_id, err)
            run.skipped.append({"fact_id": fact.fact_id, "reason": str(err)})
            continue
        run.n_computed += int(computed)
        run.n_cached += int(not computed)
        if on_fact is not None:
            on_fact(fact, computed)
    run.seconds = time.perf_counter() - start
    return run


def _trace_one(
    model, tokenizer, fact, settings, sigma, seed, fingerprint, cache, run, pool
) -> bool:
    computed = False
    md = settings.min_denominator
    draw = _str_draw(tokenizer, fact, settings, seed, pool, run) if settings.uses_str else None
    if draw is not None:
        str_noise = replacement_noise(model, encode_fact(tokenizer, fact), draw.replaced_ids)
    for kind in settings.kinds:
        if settings.uses_gaussian:
            keys = {
                w: tracing_key(fingerprint, fact, kind, w, settings.noise_samples, sigma, seed)
                for w in settings.windows
            }
            common = {"sigma": sigma, "seed": seed, "n_samples": settings.noise_samples}
            computed |= _cached_tracing(
                model, tokenizer, fact, settings, kind, keys, common, cache, run
            )
        if draw is not None:
            keys = {
                w: str_tracing_key(fingerprint, fact, kind, w, draw.subjects, seed)
                for w in settings.windows
            }
            computed |= _cached_tracing(
                model, tokenizer, fact, settings, kind, keys, {"noise": str_noise}, cache, run, draw
            )
        if not settings.zeroing:
            continue
        for window in settings.windows:
            key = zeroing_key(fingerprint, fact, kind, window)
            result = cache.get(key, md) if cache else None
            if result is None:
                computed = True
                result = zero_fact(
                    model, tokenizer, fact, kind=kind, window=window, min_denominator=md
                )
                if cache:
                    cache.put(key, result)
            run.zeroing.append(result)
    return computed


def _str_draw(tokenizer, fact, settings, seed, pool, run) -> Replacements | None:
    """The fact's STR replacements, or None (recorded as a skip with ``"corruption": "str"``;
    zeroing and Gaussian tracing of the fact go on) when no subject fits.

    Raises :class:`SkipFact` when the fact itself cannot be traced and STR is the only
    corruption (otherwise the Gaussian path raises it with the same reason)."""
    try:
        inp = encode_fact(tokenizer, fact)
    except SkipFact:
        if settings.uses_gaussian:
            return None
        raise
    try:
        draw = draw_replacements(tokenizer, fact, inp, pool, settings.noise_samples, seed)
    except SkipFact as err:
        log.warning("STR skips fact %s: %s", fact.fact_id, err)
        run.skipped.append({"fact_id": fact.fact_id, "reason": str(err), "corruption": "str"})
        return None
    run.replacements[fact.fact_id] = draw
    return draw


def _cached_tracing(
    model, tokenizer, fact, settings, kind, keys, common, cache, run, draw=None
) -> bool:
    """Results for every window from the cache or computed (and cached); True if computed."""
    md = settings.min_denominator
    found = {w: cache.get(key, md) if cache else None for w, key in keys.items()}
    missing = [w for w, result in found.items() if result is None]
    if missing:
        fresh = _compute_tracing(model, tokenizer, fact, settings, kind, missing, common)
        for result in fresh:
            if draw is not None:
                result = StrTraceResult.from_trace(result, draw.subjects, draw.source_fact_ids)
            if cache:
                cache.put(keys[result.window], result)
            found[result.window] = result
    run.tracing.extend(found[w] for w in settings.windows)
    return bool(missing)


def _compute_tracing(model, tokenizer, fact, settings, kind, windows, common) -> list[TraceResult]:
    """Gaussian noise (``sigma``, ``seed``, ``n_samples``) or given ``noise`` (STR)."""
    common = {**common, "min_denominator": settings.min_denominator}
    if settings.fast:
        return trace_fact_many(model, tokenizer, fact, kinds=(kind,), windows=windows, **common)
    return [
        trace_fact_reference(model, tokenizer, fact, kind=kind, window=w, **common) for w in windows
    ]
