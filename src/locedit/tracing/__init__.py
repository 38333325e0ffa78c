"""Causal Tracing (paper §3.2, §4.1) and representation zeroing (App. B).

``trace_fact`` is the fast exact path, ``trace_fact_reference`` the straightforward algorithm
it is checked against; ``calibrate_noise`` sets sigma from the subject embeddings;
``trace_records`` runs a list of facts with a content-keyed cache. Symmetric token replacement
(``trace.corruption: str``, Zhang & Nanda 2024) swaps the subject for a same-length one from the
run's facts instead of adding noise (:mod:`locedit.tracing.replacement`).
"""

from locedit.models.hooks import window_layers
from locedit.models.noise import NoiseConfig, fact_noise, fact_seed, noised_subject, subject_noise
from locedit.tracing.cache import ResultCache, tracing_key, zeroing_key
from locedit.tracing.causal_trace import FactRuns, trace_fact, trace_fact_many, trace_fact_reference
from locedit.tracing.noise import NoiseCalibration, calibrate_noise, noise_sigma, subject_embeddings
from locedit.tracing.patching import (
    KINDS,
    SkipFact,
    TracingInput,
    encode_fact,
    patched_target_probs,
    tracing_noise,
)
from locedit.tracing.replacement import (
    CORRUPTIONS,
    STR_METHOD,
    Replacements,
    StrTraceResult,
    SubjectPool,
    draw_replacements,
    replacement_noise,
)
from locedit.tracing.results import TraceResult, ZeroingResult
from locedit.tracing.runner import TABLE_COLUMNS, TraceRun, TraceSettings, trace_records
from locedit.tracing.zeroing import zero_fact

__all__ = [
    "CORRUPTIONS",
    "KINDS",
    "STR_METHOD",
    "TABLE_COLUMNS",
    "FactRuns",
    "NoiseCalibration",
    "NoiseConfig",
    "Replacements",
    "ResultCache",
    "SkipFact",
    "StrTraceResult",
    "SubjectPool",
    "TraceResult",
    "TraceRun",
    "TraceSettings",
    "TracingInput",
    "ZeroingResult",
    "calibrate_noise",
    "draw_replacements",
    "encode_fact",
    "fact_noise",
    "fact_seed",
    "noise_sigma",
    "noised_subject",
    "patched_target_probs",
    "replacement_noise",
    "subject_embeddings",
    "subject_noise",
    "trace_fact",
    "trace_fact_many",
    "trace_fact_reference",
    "trace_records",
    "tracing_noise",
    "tracing_key",
    "window_layers",
    "zero_fact",
    "zeroing_key",
]
