"""Column schemas of the tidy tables one stage writes and another reads (DESIGN.md §3)."""

from __future__ import annotations

#: outputs/trace/effects.parquet, in order: one row per fact x method (tracing or zeroing) x
#: component kind x window x layer, with the paper's per-layer effects (§4.1, App. B-C).
EFFECT_TABLE_COLUMNS: tuple[str, ...] = (
    "fact_id",
    "method",
    "kind",
    "window",
    "layer",
    "effect_max",
    "effect_last_subject",
    "argmax_token",
    "p_clean",
    "p_noised",
    "low_denominator",
)
