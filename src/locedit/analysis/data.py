"""Read the tracing and edit tables, pick the tracing effect to regress on, and join them.

Rows that cannot enter a regression (failed edits, facts whose tracing denominator is tiny,
(fact, layer) pairs without a tracing effect) are counted in a :class:`JoinReport`, never
dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from locedit.analysis.config import TraceSpec
from locedit.data.tables import EFFECT_TABLE_COLUMNS

log = logging.getLogger(__name__)

#: The effects-table columns the analysis needs (the token of the max effect is for figures).
EFFECT_COLUMNS = tuple(c for c in EFFECT_TABLE_COLUMNS if c != "argmax_token")
RESULT_COLUMNS = ("fact_id", "layer", "method", "problem", "status")

#: Statistics a :class:`TraceSpec` may name. ``absolute_last_subject`` is ROME's unscaled effect
#: p(o_true | s_noise, r, v) - p(o_true | s_noise, r) at the last subject token (paper Fig. 14).
STATISTICS = ("effect_max", "effect_last_subject", "absolute_last_subject")


class SchemaError(ValueError):
    """An input table that lacks columns the analysis needs."""


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SchemaError(f"{what} lacks columns {missing}; has {list(df.columns)}")


def read_effects(path: Path | str) -> pd.DataFrame:
    """outputs/trace/effects.parquet with types normalised (``fact_id`` as str, ints as ints)."""
    return normalise_effects(pd.read_parquet(path), str(path))


def _typed(
    df: pd.DataFrame, columns: tuple[str, ...], what: str, ints: tuple[str, ...]
) -> pd.DataFrame:
    """A copy of a stage's table with its columns checked, ``fact_id`` as str, ``ints`` as int."""
    _require(df, columns, what)
    df = df.copy()
    df["fact_id"] = df["fact_id"].astype(str)
    for column in ints:
        df[column] = df[column].astype(int)
    return df


def normalise_effects(df: pd.DataFrame, what: str = "effects table") -> pd.DataFrame:
    df = _typed(df, EFFECT_COLUMNS, what, ("window", "layer"))
    df["low_denominator"] = df["low_denominator"].fillna(False).astype(bool)
    return df


def read_results(path: Path | str) -> pd.DataFrame:
    """outputs/edit/results.parquet with types normalised."""
    return normalise_results(pd.read_parquet(path), str(path))


def normalise_results(df: pd.DataFrame, what: str = "results table") -> pd.DataFrame:
    df = _typed(df, RESULT_COLUMNS, what, ("layer",))
    if "dataset" not in df.columns:
        df["dataset"] = "counterfact"
    df["dataset"] = df["dataset"].fillna("counterfact").astype(str)
    if "reason" not in df.columns:
        df["reason"] = ""
    return df


def trace_table(effects: pd.DataFrame, spec: TraceSpec) -> pd.DataFrame:
    """One tracing effect per (fact_id, layer): the regressor ``trace`` for ``spec``.

    Columns: fact_id, layer, trace, low_denominator. Empty when the effects table has no
    rows for the spec's method, kind and window.
    """
    if spec.statistic not in STATISTICS:
        raise ValueError(f"trace statistic {spec.statistic!r} not among {STATISTICS}")
    sel = effects[
        (effects["method"] == spec.method)
        & (effects["kind"] == spec.kind)
        & (effects["window"] == spec.window)
    ]
    if spec.statistic == "absolute_last_subject":
        trace = sel["effect_last_subject"] * (sel["p_clean"] - sel["p_noised"])
    else:
        trace = sel[spec.statistic]
    out = pd.DataFrame(
        {
            "fact_id": sel["fact_id"].to_numpy(),
            "layer": sel["layer"].to_numpy(),
            "trace": trace.astype(float).to_numpy(),
            "low_denominator": sel["low_denominator"].to_numpy(),
            "denominator": (sel["p_clean"] - sel["p_noised"]).astype(float).to_numpy(),
        }
    )
    dup = out.duplicated(["fact_id", "layer"])
    if dup.any():
        first = out.loc[dup, ["fact_id", "layer"]].iloc[0].tolist()
        raise SchemaError(
            f"effects table has {int(dup.sum())} duplicate (fact_id, layer) rows for {spec}; "
            f"first: {first}"
        )
    return out.sort_values(["fact_id", "layer"], ignore_index=True)


#: How the regressor ``trace`` is formed: ``fraction`` (ours: the fractional effect, facts
#: whose denominator p_clean - p_noised is below tracing's threshold dropped when
#: ``drop_low_denominator``) or ``reference_code`` (the original analysis: every fact kept,
#: max(0, restore / |corruption|)).
TRACE_REGRESSORS = ("fraction", "reference_code")

#: Lower bounds of the score columns: ``none`` (ours) or ``reference_code`` (the original
#: evaluation: Fact Erasure's scores at >= 0, every other problem's at >= 2e-8).
SCORE_FLOORS = ("none", "reference_code")
REFERENCE_FLOOR = {"fact_erasure": 0.0}
REFERENCE_FLOOR_DEFAULT = 2e-8
#: The columns the original clips: its erased/recovered proportions (rewrite, paraphrase).
FLOORED_SCORES = ("rewrite_score", "paraphrase_score")


def reference_regressor(trace: pd.DataFrame) -> pd.DataFrame:
    """The original analysis's regressor: max(0, restore / |corruption|), every fact kept.

    With a positive denominator this is max(0, effect). With a negative one (the noise raised
    p(o_true)) the stored per-layer effect is min_t restore / denominator, so this gives
    max(0, min_t restore / |corruption|): the token max of the restore itself is not stored.
    """
    out = trace.copy()
    sign = np.sign(out["denominator"].to_numpy(dtype=float))
    out["trace"] = np.maximum(0.0, out["trace"].to_numpy(dtype=float) * sign)
    out["low_denominator"] = False
    return out


def floor_scores(
    results: pd.DataFrame, floor: str, columns: tuple[str, ...]
) -> pd.DataFrame:
    """Score columns clipped from below as the original evaluation does (``reference_code``);
    ``none`` returns the rows unchanged."""
    if floor not in SCORE_FLOORS:
        raise ValueError(f"analysis.score_floor {floor!r} not among {SCORE_FLOORS}")
    if floor == "none":
        return results
    out = results.copy()
    lower = out["problem"].map(REFERENCE_FLOOR).fillna(REFERENCE_FLOOR_DEFAULT).astype(float)
    for column in columns:
        if column in out.columns:
            out[column] = np.maximum(out[column].astype(float), lower)
    return out


def available_windows(effects: pd.DataFrame, method: str, kind: str) -> list[int]:
    sel = effects[(effects["method"] == method) & (effects["kind"] == kind)]
    return sorted(int(w) for w in sel["window"].unique())


@dataclass
class JoinReport:
    """What happened to each edit row on its way into the regressions."""

    n_results: int = 0
    n_failed: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    n_missing_trace: int = 0
    n_low_denominator: int = 0
    low_denominator_dropped: bool = True
    n_nonfinite_trace: int = 0
    n_used: int = 0

    def lines(self) -> list[str]:
        """Plain-language accounting for reports."""
        out = [f"{self.n_results} edit rows read; {self.n_used} enter the regressions."]
        if self.n_failed:
            reasons = ", ".join(
                f"{r or 'no reason given'}: {n}" for r, n in self.failed_reasons.items()
            )
            out.append(f"{self.n_failed} failed edits excluded ({reasons}).")
        if self.n_missing_trace:
            out.append(
                f"{self.n_missing_trace} successful edits have no tracing effect for their (fact, layer) and are excluded."
            )
        if self.n_nonfinite_trace:
            out.append(
                f"{self.n_nonfinite_trace} successful edits have a non-finite tracing effect and are excluded."
            )
        if self.n_low_denominator:
            verb = "excluded" if self.low_denominator_dropped else "kept"
            out.append(
                f"{self.n_low_denominator} successful edits belong to facts whose tracing denominator "
                f"p_clean - p_noised is below the threshold (flagged low_denominator); {verb}."
            )
        return out


def join_trace(
    results: pd.DataFrame, trace: pd.DataFrame, drop_low_denominator: bool = True
) -> tuple[pd.DataFrame, JoinReport]:
    """Successful edit rows with their tracing effect ``trace`` at the edit layer.

    Joined on (fact_id, layer); the report counts every row left out and why.
    """
    report = JoinReport(n_results=len(results), low_denominator_dropped=drop_low_denominator)
    ok = results["status"].astype(str) == "ok"
    failed = results[~ok]
    report.n_failed = len(failed)
    report.failed_reasons = dict(Counter(failed["reason"].fillna("").astype(str)))
    merged = results[ok].merge(trace, on=["fact_id", "layer"], how="left", indicator=True)
    missing = merged["_merge"] == "left_only"
    report.n_missing_trace = int(missing.sum())
    merged = merged[~missing].drop(columns="_merge")
    nonfinite = ~np.isfinite(merged["trace"].to_numpy(dtype=float))
    report.n_nonfinite_trace = int(nonfinite.sum())
    merged = merged[~nonfinite]
    low = merged["low_denominator"].fillna(False).astype(bool)
    report.n_low_denominator = int(low.sum())
    if drop_low_denominator:
        merged = merged[~low]
    merged = merged.reset_index(drop=True)
    report.n_used = len(merged)
    return merged, report


def concentrated_facts(
    trace: pd.DataFrame, max_other_layers: int = 3, fraction: float = 0.5
) -> pd.DataFrame:
    """Per fact: is its tracing curve concentrated in a few layers? (paper App. B, Table 2).

    A fact is concentrated when at most ``max_other_layers`` layers besides its argmax layer
    reach ``fraction`` of its maximum effect. Facts whose maximum is not positive have no
    localization to concentrate and are marked not concentrated, with a reason.
    """
    rows = []
    for fact_id, curve in trace.groupby("fact_id", sort=True):
        effects = curve["trace"].to_numpy(dtype=float)
        layers = curve["layer"].to_numpy()
        finite = np.isfinite(effects)
        if not finite.any():
            rows.append((fact_id, np.nan, -1, -1, False, "no finite effect"))
            continue
        effects, layers = effects[finite], layers[finite]
        best = int(np.argmax(effects))
        peak = float(effects[best])
        if peak <= 0:
            rows.append(
                (fact_id, peak, int(layers[best]), -1, False, "maximum effect not positive")
            )
            continue
        near = int((effects >= fraction * peak).sum()) - 1
        rows.append((fact_id, peak, int(layers[best]), near, near <= max_other_layers, ""))
    return pd.DataFrame(
        rows,
        columns=[
            "fact_id",
            "max_effect",
            "argmax_layer",
            "n_other_layers_near_max",
            "concentrated",
            "reason",
        ],
    )
