"""The headline numbers, their detail and per-layer curves as small files for DVC.

``metrics.json`` is the headline (dvc.yaml ``metrics:``, so ``dvc exp show`` shows it): per
problem and method the R² of rewrite score by layer, by trace and by both, the added R² with its
bootstrap CI and the F-test p (the paper's Table 3), and the counts of edits, facts and failed
edits; the same values are the metrics of the pipeline's MLflow run. ``metrics_detail.json``
holds the rest (stage seconds, the random-location baseline per condition, mean rewrite score
per layer): ``dvc metrics show reports/metrics_detail.json``. ``dvc plots show/diff`` draws the
two long-format CSV files under ``plots/`` (one line per ``series``, template
``.dvc/plots/series.json``): the mean rewrite score by edit layer per (method, problem), and
the mean tracing effect by layer per tracing kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from locedit.analysis.random_baseline import metrics_tree
from locedit.analysis.study import MAIN, Analysis
from locedit.tracking import dotted

METRICS_FILE = "metrics.json"
DETAIL_FILE = "metrics_detail.json"
PLOTS_DIR = "plots"
REWRITE_CURVE = "rewrite_by_layer.csv"
TRACE_CURVE = "trace_by_layer.csv"

#: Per-condition statistics of the main regression kept in metrics.json (Table 3's columns).
HEADLINE_STATS = (
    "r2_layer",
    "r2_trace",
    "r2_both",
    "added_r2",
    "added_r2_lo",
    "added_r2_hi",
    "f_pvalue",
)
#: The score whose regressions are the headline (the paper's Table 3).
HEADLINE_SCORE = "rewrite_score"


def _number(value: Any) -> float | int | None:
    """JSON-safe number: NaN and infinities become null (DVC and MLflow read plain JSON)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if isinstance(value, int) or (hasattr(value, "dtype") and "int" in str(value.dtype)):
        return int(value)
    return round(number, 6)


def headline_metrics(an: Analysis) -> dict[str, Any]:
    """``{edits, facts, failed, <problem>: {<method>: {r2_layer, ...}}}``.

    Counts are over the edit table (every dataset); the R² values are the main variant on the
    main dataset for rewrite score, as in the paper's Table 3.
    """
    results = an.results
    ok = results["status"].astype(str) == "ok" if "status" in results else pd.Series(dtype=bool)
    out: dict[str, Any] = {
        "edits": int(len(results)),
        "facts": int(results["fact_id"].nunique()) if "fact_id" in results else 0,
        "failed": int((~ok).sum()),
    }
    regs = an.regressions
    if not regs.empty:
        main = regs[
            (regs["variant"] == MAIN)
            & (regs["dataset"] == an.main_dataset)
            & (regs["metric"] == HEADLINE_SCORE)
        ]
        for _, row in main.iterrows():
            stats = {stat: _number(row.get(stat)) for stat in HEADLINE_STATS}
            out.setdefault(str(row["problem"]), {})[str(row["method"])] = stats
    return out


def detail_metrics(an: Analysis, seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
    """``{seconds: {stage: s}, random_baseline: {...}, rewrite_by_layer: {<problem>:
    {<method>: {<layer>: mean}}}}``: what the headline leaves out."""
    out: dict[str, Any] = {}
    if seconds:
        out["seconds"] = {stage: _number(value) for stage, value in seconds.items()}
    out.update(metrics_tree(an.random_baseline))
    by_layer: dict[str, Any] = {}
    for _, row in rewrite_curve(an).iterrows():
        problem = by_layer.setdefault(str(row["problem"]), {})
        problem.setdefault(str(row["method"]), {})[str(int(row["layer"]))] = _number(
            row[HEADLINE_SCORE]
        )
    if by_layer:
        out["rewrite_by_layer"] = by_layer
    return out


def rewrite_curve(an: Analysis) -> pd.DataFrame:
    """Mean rewrite score by edit layer, one series per (method, problem), successful edits only."""
    columns = ["series", "method", "problem", "layer", HEADLINE_SCORE, "n"]
    results = an.results
    if results.empty or HEADLINE_SCORE not in results:
        return pd.DataFrame(columns=columns)
    ok = results[results["status"].astype(str) == "ok"]
    if an.main_dataset is not None and "dataset" in ok:
        ok = ok[ok["dataset"] == an.main_dataset]
    curve = (
        ok.groupby(["method", "problem", "layer"], sort=True)[HEADLINE_SCORE]
        .agg(["mean", "size"])
        .reset_index()
        .rename(columns={"mean": HEADLINE_SCORE, "size": "n"})
    )
    curve["series"] = curve["method"].astype(str) + " / " + curve["problem"].astype(str)
    curve["layer"] = curve["layer"].astype(int)
    return curve[columns]


def trace_curve(an: Analysis) -> pd.DataFrame:
    """Mean effect (max over tokens) by layer, one series per (method, kind, window) traced."""
    columns = ["series", "method", "kind", "window", "layer", "effect", "n_facts"]
    effects = an.effects
    if effects.empty or "effect_max" not in effects:
        return pd.DataFrame(columns=columns)
    curve = (
        effects.groupby(["method", "kind", "window", "layer"], sort=True)
        .agg(effect=("effect_max", "mean"), n_facts=("fact_id", "nunique"))
        .reset_index()
    )
    curve["series"] = (
        curve["method"].astype(str)
        + " "
        + curve["kind"].astype(str)
        + " w"
        + curve["window"].astype(int).astype(str)
    )
    curve["layer"] = curve["layer"].astype(int)
    return curve[columns]


def write_dvc_files(
    an: Analysis, directory: Path, seconds: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Write ``directory``/metrics.json (headline), metrics_detail.json and the two curve CSVs
    under ``directory``/plots/. Returns the headline metrics as written."""
    plots = directory / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    metrics = headline_metrics(an)
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    detail = detail_metrics(an, seconds)
    (directory / DETAIL_FILE).write_text(json.dumps(detail, indent=2) + "\n")
    rewrite_curve(an).to_csv(plots / REWRITE_CURVE, index=False, float_format="%.6g")
    trace_curve(an).to_csv(plots / TRACE_CURVE, index=False, float_format="%.6g")
    return metrics


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``a.b.c`` -> number, dropping nulls: metrics.json as MLflow metrics."""
    return {
        name: float(value)
        for name, value in dotted(metrics, prefix)
        if isinstance(value, int | float) and math.isfinite(float(value))
    }
