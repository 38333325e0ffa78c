"""reports/summary.md: the finding for this model in plain words, with the numbers behind it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from locedit.analysis.labels import method_label, problem_label, sort_methods, sort_problems
from locedit.analysis.random_baseline import summary_lines
from locedit.analysis.study import MAIN, Analysis

#: Added R² below this counts as "tracing adds little" (the paper's largest was 0.032).
SMALL_ADDED_R2 = 0.05


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%" if math.isfinite(value) else "n/a"


def _p(value: float) -> str:
    """``p = 0.03`` / ``p < 1e-4`` / ``p n/a``."""
    if not math.isfinite(value):
        return "p n/a"
    return "p < 1e-4" if value < 1e-4 else f"p = {value:.3g}"


def _r(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


def _ci(row: pd.Series, stat: str) -> str:
    lo, hi = row.get(f"{stat}_lo", math.nan), row.get(f"{stat}_hi", math.nan)
    if not (isinstance(lo, float) and math.isfinite(lo)):
        return ""
    return f" (bootstrap CI over facts {_pct(lo)} to {_pct(hi)})"


def _condition(row: pd.Series) -> str:
    return f"{method_label(row['method'])}, {problem_label(row['problem'])}"


def finding(an: Analysis, model_name: str) -> list[str]:
    """The headline paragraphs: layer vs. tracing for rewrite score, in words and numbers."""
    r = an.regressions
    if r.empty:
        return [
            "No regression could be fitted: the joined tracing and edit tables are empty (see the accounting below)."
        ]
    main = r[
        (r["variant"] == MAIN)
        & (r["dataset"] == an.main_dataset)
        & (r["metric"] == "rewrite_score")
    ]
    if main.empty:
        return ["No rewrite-score regressions were fitted for the main dataset."]
    data = an.joined[MAIN]
    data = data[data["dataset"] == an.main_dataset]
    lines = [
        f"Model **{model_name}**, dataset **{an.main_dataset}**: {data['fact_id'].nunique()} facts, "
        f"{data['layer'].nunique()} edit layer{'s' if data['layer'].nunique() != 1 else ''} ({', '.join(map(str, sorted(data['layer'].unique())))}), "
        f"methods {', '.join(method_label(m) for m in sort_methods(data['method']))}, "
        f"problems {', '.join(problem_label(p) for p in sort_problems(data['problem']))}. "
        f"Tracing effect: {an.config.trace.label()}."
    ]
    head = main[(main["method"] == "rome") & (main["problem"] == "error_injection")]
    if not head.empty:
        row = head.iloc[0]
        lines.append(
            f"For ROME on Error Injection, the edit layer explains {_pct(row['r2_layer'])} of the variance in "
            f"rewrite score{_ci(row, 'r2_layer')}; the tracing effect alone explains {_pct(row['r2_trace'])}; "
            f"adding the tracing effect (and its interaction with layer) to the layer raises R² by "
            f"{_pct(row['added_r2'])}{_ci(row, 'added_r2')}, F-test {_p(row['f_pvalue'])}. "
            f"Across all edits at all layers, rewrite score and tracing effect correlate at "
            f"r = {_r(row['pearson_r'])} ({_p(row['pearson_p'])})."
            + (
                f" Caveats: {row['reason']}."
                if isinstance(row["reason"], str) and row["reason"]
                else ""
            )
        )
    finite = main[np.isfinite(main["added_r2"].astype(float))]
    if not finite.empty:
        best = finite.loc[finite["added_r2"].idxmax()]
        layer_wins = int((finite["r2_layer"] > finite["r2_trace"]).sum())
        verdict = (
            "As in the paper, where Causal Tracing localizes a fact says little about where editing it succeeds: "
            "the choice of edit layer explains far more of edit success than the tracing effect does."
            if best["added_r2"] < SMALL_ADDED_R2 and layer_wins >= len(finite) / 2
            else "Unlike the paper's GPT-J result, the tracing effect adds a noticeable share of explained variance "
            "in at least one condition; see Table 3 and the intervals before reading much into it."
        )
        lines.append(
            f"Across {len(finite)} method x problem conditions, the layer-only model explains on average "
            f"{_pct(float(finite['r2_layer'].mean()))} of rewrite-score variance, and tracing adds at most "
            f"{_pct(float(best['added_r2']))} ({_condition(best)}; F-test {_p(best['f_pvalue'])}). "
            f"The layer explains more than the tracing effect alone in {layer_wins} of {len(finite)} conditions. "
            f"**{verdict}**"
        )
    mixed = main.iloc[0:0]
    if "mixed_lr_pvalue" in main:
        mixed = main[np.isfinite(main["mixed_lr_pvalue"].astype(float))]
    if not mixed.empty:
        parts = [
            f"{_condition(row)}: added marginal R² {_pct(row['mixed_added_r2m'])}, LR {_p(row['mixed_lr_pvalue'])}"
            for _, row in mixed.iterrows()
        ]
        lines.append(
            "With a random intercept per fact (mixed model, beyond the paper): "
            + "; ".join(parts)
            + "."
        )
    return lines


def _correlations(an: Analysis) -> list[str]:
    c = an.correlations
    if c.empty:
        return []
    sel = c[
        (c["variant"] == MAIN)
        & (c["dataset"] == an.main_dataset)
        & (c["method"] == "rome")
        & (c["problem"] == "error_injection")
        & (c["metric"] == "rewrite_score")
    ]
    sel = sel[np.isfinite(sel["pearson_r"].astype(float))]
    if sel.empty:
        return []
    lo, hi = sel.loc[sel["pearson_r"].idxmin()], sel.loc[sel["pearson_r"].idxmax()]
    return [
        f"Within single edit layers (Fig. 15), the correlation of ROME's rewrite score with the tracing effect "
        f"ranges from r = {lo['pearson_r']:.2f} (layer {int(lo['layer'])}, {_p(lo['p_value'])}) to "
        f"r = {hi['pearson_r']:.2f} (layer {int(hi['layer'])}, {_p(hi['p_value'])})."
    ]


def _variants(an: Analysis) -> list[str]:
    r = an.regressions
    if r.empty:
        return []
    rows = [
        "| Variant | Where in the paper | Conditions | Max added R² | Condition |",
        "|---|---|---|---|---|",
    ]
    for name, variant in an.variants.items():
        part = r[
            (r["variant"] == name)
            & (r["dataset"] == an.main_dataset)
            & (r["metric"] == "rewrite_score")
        ]
        part = part[np.isfinite(part["added_r2"].astype(float))]
        if part.empty:
            rows.append(f"| {variant.label()} | {variant.paper} | 0 | n/a | |")
            continue
        best = part.loc[part["added_r2"].idxmax()]
        rows.append(
            f"| {variant.label()} | {variant.paper} | {len(part)} | {_pct(best['added_r2'])} | {_condition(best)} |"
        )
    return rows


def summary_markdown(
    an: Analysis, model_name: str, tables: list[str], figures: list[str], notes: list[str]
) -> str:
    """The one-page summary."""
    out = [f"# Does localization inform editing? {model_name}", "", "## Finding", ""]
    for para in finding(an, model_name) + _correlations(an):
        out += [para, ""]
    if an.concentration is not None:
        n = int(an.concentration["concentrated"].sum())
        out += [
            f"{n} of {len(an.concentration)} traced facts have concentrated tracing effects "
            f"(at most {an.config.concentrated_max_other_layers} other layers at >= "
            f"{an.config.concentrated_fraction:.0%} of the peak; Table 2).",
            "",
        ]
    variants = _variants(an)
    if variants:
        out += ["## Robustness: rewrite score under each tracing variant", "", *variants, ""]
    baseline = summary_lines(an.random_baseline)
    if baseline:
        out += ["## Random-location baseline (beyond the paper)", "", *baseline, ""]
    out += ["## Data accounting", ""]
    report = an.reports.get(MAIN)
    if report is not None:
        out += [f"- {line}" for line in report.lines()]
    if an.config.bootstrap_samples:
        out.append(
            f"- Intervals: {an.config.bootstrap_samples} bootstrap samples of facts (all layers of a drawn fact "
            f"together), percentile {an.config.ci_level:.0%} intervals."
        )
    out.append("")
    if notes:
        out += ["## Skipped", "", *[f"- {n}" for n in notes], ""]
    out += [
        "## Files",
        "",
        "Tables: " + ", ".join(tables),
        "",
        "Figures: " + ", ".join(figures),
        "",
    ]
    return "\n".join(out)
