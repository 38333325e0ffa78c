"""reports/summary.md: the finding for this model in plain words, with the numbers behind it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from locedit.analysis.claims import (
    ALPHA,
    PAPER_MAX_ADDED_R2,
    PAPER_ROME_LAYER_R2,
    SMALL_SAMPLE_FACTS,
    added_versus_paper,
    adds_more_than_paper,
    finite,
    interval,
    pct,
    sample,
    versus_paper,
)
from locedit.analysis.labels import method_label, problem_label, sort_methods, sort_problems
from locedit.analysis.random_baseline import summary_lines
from locedit.analysis.study import MAIN, Analysis


def _p(value: float) -> str:
    """``p = 0.03`` / ``p < 1e-4`` / ``p n/a``."""
    if not math.isfinite(value):
        return "p n/a"
    return "p < 1e-4" if value < 1e-4 else f"p = {value:.3g}"


def _r(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


def _ci(row: pd.Series, stat: str, level: float) -> str:
    return interval(row.get(f"{stat}_lo", math.nan), row.get(f"{stat}_hi", math.nan), level)


def _sample(row: pd.Series) -> str:
    return sample(int(row["n"]), int(row["n_facts"]))


def _condition(row: pd.Series) -> str:
    return f"{method_label(row['method'])}, {problem_label(row['problem'])}"


def _headline(row: pd.Series, level: float) -> str:
    """ROME / Error Injection, the paper's Table 1 condition, against the paper's values."""
    layer = versus_paper(
        row.get("r2_layer_lo"), row.get("r2_layer_hi"), PAPER_ROME_LAYER_R2, "GPT-J value"
    )
    added = added_versus_paper(row.get("added_r2_lo"), row.get("added_r2_hi"), row["f_pvalue"])
    return (
        f"For ROME on Error Injection ({_sample(row)}), the edit layer explains "
        f"{pct(row['r2_layer'])} of the variance in rewrite score ({_ci(row, 'r2_layer', level)}; "
        f"{layer}); the tracing effect alone explains {pct(row['r2_trace'])} "
        f"({_ci(row, 'r2_trace', level)}); adding the tracing effect (and its interaction with "
        f"layer) to the layer raises R² by {pct(row['added_r2'])} ({_ci(row, 'added_r2', level)}, "
        f"F-test {_p(row['f_pvalue'])}; {added}). Across all edits at all layers, rewrite score "
        f"and tracing effect correlate at Pearson r = {_r(row['pearson_r'])} "
        f"({_p(row['pearson_p'])})."
        + (f" Caveats: {row['reason']}." if isinstance(row["reason"], str) and row["reason"] else "")
    )


def _common_sample(rows: pd.DataFrame) -> str | None:
    """The rows' n when they all share it (then it is stated once, not per condition)."""
    pairs = set(zip(rows["n"].astype(int), rows["n_facts"].astype(int), strict=True))
    return sample(*pairs.pop()) if len(pairs) == 1 else None


def _item(row: pd.Series, stat: str, level: float, common: str | None) -> str:
    """``19.7% (FT (1 layer), Error Injection; 95% CI 8.3% to 55.8%[; n = ...])``."""
    n = "" if common else f"; {_sample(row)}"
    return f"{pct(row[stat])} ({_condition(row)}; {_ci(row, stat, level)}{n})"


def _verdict(rows: pd.DataFrame, level: float, common: str | None) -> str:
    """A difference from the paper only where :func:`adds_more_than_paper` holds; otherwise
    none is claimed; small samples are named in the sentence."""
    lo = rows["added_r2_lo"] if "added_r2_lo" in rows else pd.Series(math.nan, index=rows.index)
    hi = rows["added_r2_hi"] if "added_r2_hi" in rows else pd.Series(math.nan, index=rows.index)
    more = pd.Series(
        [adds_more_than_paper(lo[i], hi[i], rows.at[i, "f_pvalue"]) for i in rows.index],
        index=rows.index,
    )
    above = rows[more]
    # interval above the paper's value, F-test not significant: named, but no difference claimed
    unclear = rows[lo.map(finite) & (lo > PAPER_MAX_ADDED_R2) & ~more]
    few = int(rows["n_facts"].min())
    paper = f"the paper's largest added R² ({pct(PAPER_MAX_ADDED_R2)}, GPT-J Table 3)"
    if not above.empty:
        listed = "; ".join(
            f"{_item(row, 'added_r2', level, common)}, F-test {_p(row['f_pvalue'])}"
            for _, row in above.iterrows()
        )
        small = (
            f" These rest on only {int(above['n_facts'].min())} facts, a small sample: the "
            "intervals are wide and the size of the difference is uncertain."
            if int(above["n_facts"].min()) < SMALL_SAMPLE_FACTS
            else ""
        )
        return (
            f"**Unlike the paper's GPT-J result, the tracing effect adds more explained variance "
            f"than {paper} in {len(above)} of {len(rows)} conditions: {listed}** (each "
            f"{level:.0%} interval lies above {pct(PAPER_MAX_ADDED_R2)} and the F-test has "
            f"p < {ALPHA}).{small}"
        )
    if not (lo.map(finite) & hi.map(finite)).any():
        return (
            "Without bootstrap intervals (analysis.bootstrap_samples is 0, or too few facts) no "
            "difference from the paper's GPT-J result is stated."
        )
    best = rows.loc[rows["added_r2"].astype(float).idxmax()]
    largest = (
        f" The largest estimate, {_item(best, 'added_r2', level, common)}, F-test "
        f"{_p(best['f_pvalue'])}, is not distinguishable from it."
        if best["added_r2"] > PAPER_MAX_ADDED_R2 and best.name not in unclear.index
        else ""
    )
    if not unclear.empty:
        largest += (
            f" In {len(unclear)} condition{'s' if len(unclear) != 1 else ''} "
            f"({'; '.join(_condition(row) for _, row in unclear.iterrows())}) the interval lies "
            f"above {pct(PAPER_MAX_ADDED_R2)} but the F-test does not reject that tracing adds "
            "nothing; the added R² is never negative and is inflated with few facts, so no "
            "difference is claimed."
        )
    small = (
        f" With only {few} facts, a small sample, every interval is wide: this is no evidence of "
        "a difference, not a replication of the paper."
        if few < SMALL_SAMPLE_FACTS
        else ""
    )
    return (
        f"**No condition shows a difference from the paper's finding that the tracing effect adds "
        f"little to the edit layer** (no {level:.0%} interval for the added R² lies above "
        f"{paper} with a significant F-test).{largest}{small}"
    )


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
    level = an.config.ci_level
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
        lines.append(_headline(head.iloc[0], level))
    rows = main[np.isfinite(main["added_r2"].astype(float))]
    if not rows.empty:
        common = _common_sample(rows)
        layer = rows["r2_layer"].astype(float)
        lo, hi = rows.loc[layer.idxmin()], rows.loc[layer.idxmax()]
        spread = (
            f"from {_item(lo, 'r2_layer', level, common)} to {_item(hi, 'r2_layer', level, common)}"
            if len(rows) > 1
            else _item(lo, "r2_layer", level, common)
        )
        layer_wins = int((rows["r2_layer"] > rows["r2_trace"]).sum())
        lines.append(
            f"Across {len(rows)} method x problem conditions"
            + (f" (each with {common})" if common else "")
            + f", the layer-only model explains {spread} of rewrite-score variance. The layer "
            f"explains more than the tracing effect alone in {layer_wins} of {len(rows)} "
            "conditions. "
            + _verdict(rows, level, common)
        )
    mixed = main.iloc[0:0]
    if "mixed_lr_pvalue" in main:
        mixed = main[np.isfinite(main["mixed_lr_pvalue"].astype(float))]
    if not mixed.empty:
        common = _common_sample(mixed)
        parts = [
            f"{_condition(row)}: added marginal R² {pct(row['mixed_added_r2m'])}"
            + ("" if common else f" ({_sample(row)})")
            + f", LR {_p(row['mixed_lr_pvalue'])}"
            for _, row in mixed.iterrows()
        ]
        lines.append(
            "With a random intercept per fact (mixed model, beyond the paper"
            + (f"; each with {common}" if common else "")
            + "; no bootstrap interval: the likelihood-ratio test is its measure of uncertainty): "
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
    few = int(sel["n"].min())
    small = (
        f" With {few} facts per layer, a small sample, each of these correlations is rough."
        if few < SMALL_SAMPLE_FACTS
        else ""
    )
    return [
        f"Within single edit layers (Fig. 15), the Pearson correlation of ROME's rewrite score with "
        f"the tracing effect ranges from r = {lo['pearson_r']:.2f} (layer {int(lo['layer'])}, "
        f"n = {int(lo['n'])}, {_p(lo['p_value'])}) to r = {hi['pearson_r']:.2f} "
        f"(layer {int(hi['layer'])}, n = {int(hi['n'])}, {_p(hi['p_value'])}).{small}"
    ]


def _variants(an: Analysis) -> list[str]:
    """Per tracing variant the largest added R², with its interval, its n and how it compares
    with the paper's largest value; a line under the table names the small samples."""
    r = an.regressions
    if r.empty:
        return []
    level = an.config.ci_level
    rows = [
        f"| Variant | Where in the paper | Conditions | Max added R² | {level:.0%} CI | n (edits / facts) "
        f"| vs. paper's {pct(PAPER_MAX_ADDED_R2)} | Condition |",
        "|---|---|---|---|---|---|---|---|",
    ]
    small = []
    for name, variant in an.variants.items():
        part = r[
            (r["variant"] == name)
            & (r["dataset"] == an.main_dataset)
            & (r["metric"] == "rewrite_score")
        ]
        part = part[np.isfinite(part["added_r2"].astype(float))]
        if part.empty:
            rows.append(f"| {variant.label()} | {variant.paper} | 0 | n/a | | | | |")
            continue
        best = part.loc[part["added_r2"].idxmax()]
        lo, hi = best.get("added_r2_lo", math.nan), best.get("added_r2_hi", math.nan)
        if not (finite(lo) and finite(hi)):
            versus = "no interval"
        elif adds_more_than_paper(lo, hi, best["f_pvalue"]):
            versus = "above (interval excludes it, F-test significant)"
        elif lo > PAPER_MAX_ADDED_R2:
            versus = "interval above, F-test not significant: none claimed"
        else:
            versus = "no difference shown"
        n_facts = int(best["n_facts"])
        rows.append(
            f"| {variant.label()} | {variant.paper} | {len(part)} | {pct(best['added_r2'])} | "
            f"{interval(lo, hi, level).removeprefix(f'{level:.0%} CI ')} | {int(best['n'])} / "
            f"{n_facts} | {versus} | {_condition(best)} |"
        )
        if n_facts < SMALL_SAMPLE_FACTS:
            small.append(f"{variant.label()} ({n_facts} facts)")
    if small:
        rows += [
            "",
            f"Small samples (fewer than {SMALL_SAMPLE_FACTS} facts: wide or rough intervals, "
            "read no size into them): " + "; ".join(small) + ".",
        ]
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
