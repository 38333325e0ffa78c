"""The paper's tables (1-8) from an :class:`~locedit.analysis.study.Analysis`, as CSV and Markdown.

Columns follow the paper; the beyond-the-paper statistics (bootstrap intervals over facts, the
mixed model with a random intercept per fact) sit to the right of the paper's columns. A table
whose inputs are absent is not written; the reason is returned as a note instead.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from locedit.analysis import random_baseline as baseline
from locedit.analysis.labels import (
    method_label,
    method_rank,
    metric_label,
    problem_label,
    problem_rank,
    sort_methods,
)
from locedit.analysis.specificity import specificity_means
from locedit.analysis.study import MAIN, ZSRE, Analysis

#: Tables 3-6: the metric each explains (paper App. C).
METRIC_TABLES = {
    "table3": "rewrite_score",
    "table4": "paraphrase_score",
    "table5": "neighborhood_score",
    "table6": "overall_score",
}


@dataclass
class Table:
    """A numeric table plus how to print it: which columns are p values and which form intervals."""

    name: str
    title: str
    frame: pd.DataFrame
    p_columns: tuple[str, ...] = ()
    ci_pairs: tuple[tuple[str, str, str], ...] = ()  # (label, low column, high column)
    int_columns: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    sci_columns: tuple[str, ...] = ()  # printed with 3 significant digits (small KL values)

    def to_markdown(self) -> str:
        hidden = {c for _, lo, hi in self.ci_pairs for c in (lo, hi)}
        columns = [c for c in self.frame.columns if c not in hidden]
        labels = columns + [label for label, _, _ in self.ci_pairs]
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(labels) + " |",
            "|" + "---|" * len(labels),
        ]
        for _, row in self.frame.iterrows():
            cells = [self._cell(c, row[c]) for c in columns]
            cells += [
                f"[{_num(row[lo])}, {_num(row[hi])}]" if _finite(row[lo]) else "n/a"
                for _, lo, hi in self.ci_pairs
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n\n"

    def _cell(self, column: str, value) -> str:
        if column in self.p_columns:
            return _pvalue(value)
        if column in self.int_columns and _finite(value):
            return str(int(value))
        if column in self.sci_columns and _finite(value):
            return f"{value:.3g}"
        if isinstance(value, numbers.Real) and not isinstance(value, bool | int):
            return _num(value)
        return str(value)

    def write(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        csv = directory / f"{self.name}.csv"
        md = directory / f"{self.name}.md"
        self.frame.to_csv(csv, index=False)
        md.write_text(self.to_markdown())
        return [csv, md]


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _num(value) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


def _pvalue(value) -> str:
    if not _finite(value):
        return "n/a"
    return "<1e-4" if value < 1e-4 else f"{value:.3g}" if value < 0.001 else f"{value:.3f}"


def _slice(
    an: Analysis,
    variant: str,
    dataset: str | None,
    metric: str,
    problem: str | None = None,
    method: str | None = None,
) -> pd.DataFrame:
    r = an.regressions
    if r.empty:
        return r
    sel = (r["variant"] == variant) & (r["dataset"] == dataset) & (r["metric"] == metric)
    if problem is not None:
        sel &= r["problem"] == problem
    if method is not None:
        sel &= r["method"] == method
    return r[sel]


def _reason_notes(rows: pd.DataFrame) -> list[str]:
    notes = []
    for _, row in rows.iterrows():
        reasons = [
            x
            for x in (row.get("reason", ""), row.get("mixed_reason", ""))
            if isinstance(x, str) and x
        ]
        if reasons:
            notes.append(
                f"{problem_label(row['problem'])}, {method_label(row['method'])}: {'; '.join(reasons)}."
            )
    return notes


def _extras(rows: pd.DataFrame) -> dict[str, pd.Series]:
    cols = {
        "Both CI low": rows.get("r2_both_lo"),
        "Both CI high": rows.get("r2_both_hi"),
        "Diff CI low": rows.get("added_r2_lo"),
        "Diff CI high": rows.get("added_r2_hi"),
        "Mixed LR p": rows.get("mixed_lr_pvalue"),
        "Mixed added R²m": rows.get("mixed_added_r2m"),
        "n": rows["n"],
        "Facts": rows["n_facts"],
    }
    return {k: (v.to_numpy() if v is not None else math.nan) for k, v in cols.items()}


_CI = (
    ("Both 95% CI", "Both CI low", "Both CI high"),
    ("Diff 95% CI", "Diff CI low", "Diff CI high"),
)


def _r2_table(
    name: str,
    title: str,
    rows: pd.DataFrame,
    leading: dict[str, object],
    trace_column: str = "Trace",
    mixed: bool = True,
    notes: list[str] | None = None,
) -> Table:
    """Layer / Trace / Both / Diff / p-value in the paper's layout, our extras to the right."""
    extras = _extras(rows)
    if not mixed:
        extras = {k: v for k, v in extras.items() if not k.startswith("Mixed")}
    frame = pd.DataFrame(
        {
            **leading,
            "Layer": rows["r2_layer"].to_numpy(),
            trace_column: rows["r2_trace"].to_numpy(),
            "Both": rows["r2_both"].to_numpy(),
            "Diff": rows["added_r2"].to_numpy(),
            "p-value": rows["f_pvalue"].to_numpy(),
            **extras,
        }
    )
    return Table(
        name,
        title,
        frame,
        p_columns=("p-value", "Mixed LR p") if mixed else ("p-value",),
        ci_pairs=_CI,
        int_columns=("n", "Facts"),
        notes=(notes or []) + _reason_notes(rows),
    )


def table1(an: Analysis) -> Table | str:
    """R² for predicting ROME's rewrite score in Error Injection (paper Table 1)."""
    rows = _slice(an, MAIN, an.main_dataset, "rewrite_score", "error_injection", "rome")
    if rows.empty:
        return "Table 1 skipped: no ROME / Error Injection rewrite scores in the results."
    title = f"Table 1: R² for predicting ROME edit success (rewrite score, Error Injection, {an.main_dataset})"
    return _r2_table("table1", title, rows, {"Method": ["ROME"]}, trace_column="Tracing Effect")


def table2(an: Analysis) -> Table | str:
    """Table 1 on facts whose tracing effects are concentrated in a few layers (paper Table 2)."""
    if "concentrated" not in an.variants:
        return "Table 2 skipped: the concentrated-subset variant is off or has no tracing effects."
    rows = _slice(an, "concentrated", an.main_dataset, "rewrite_score", "error_injection", "rome")
    conc = an.concentration
    n_conc = int(conc["concentrated"].sum()) if conc is not None else 0
    n_all = len(conc) if conc is not None else 0
    if rows.empty:
        return f"Table 2 skipped: {n_conc} of {n_all} facts are concentrated and none has a ROME / Error Injection rewrite score."
    cfg = an.config
    note = (
        f"{n_conc} of {n_all} traced facts are concentrated: at most {cfg.concentrated_max_other_layers} layers "
        f"besides the peak reach {cfg.concentrated_fraction:.0%} of the peak effect."
    )
    title = (
        "Table 2: R² for predicting ROME edit success on facts with concentrated tracing effects"
    )
    return _r2_table(
        "table2", title, rows, {"Method": ["ROME"]}, "Tracing Effect", mixed=False, notes=[note]
    )


def metric_table(an: Analysis, name: str, metric: str, variant: str = MAIN) -> Table | str:
    """R² of Layer, Trace and Both per problem and method for one metric (paper Tables 3-6)."""
    number = name.removeprefix("table")
    rows = _slice(an, variant, an.main_dataset, metric)
    if rows.empty:
        return f"Table {number} skipped: no {metric_label(metric).lower()} in the results (or {metric} is not in analysis.metrics)."
    leading = {
        "Editing Problem": rows["problem"].map(problem_label).to_numpy(),
        "Method": rows["method"].map(method_label).to_numpy(),
    }
    title = f"Table {number}: R² for predicting {metric_label(metric).lower()} from edit layer and tracing effect ({an.main_dataset})"
    return _r2_table(name, title, rows, leading)


def error_table(an: Analysis, name: str, dataset: str | None, title: str) -> Table | str:
    """R², RMSE and MAE of Layer vs. Tracing Effect (paper Tables 7 and 8; Both added)."""
    metrics = [m for m in ("rewrite_score", "overall_score") if m in an.config.metrics]
    r = an.regressions
    if r.empty or dataset is None:
        return f"{title.split(':')[0]} skipped: no regressions for dataset {dataset}."
    rows = r[
        (r["variant"] == MAIN)
        & (r["dataset"] == dataset)
        & (r["problem"] == "error_injection")
        & r["metric"].isin(metrics)
    ]
    if rows.empty:
        return f"{title.split(':')[0]} skipped: no Error Injection rewrite/overall scores for dataset {dataset}."
    out = []
    for method in sort_methods(rows["method"]):
        for metric in metrics:
            hit = rows[(rows["method"] == method) & (rows["metric"] == metric)]
            if hit.empty:
                continue
            row = hit.iloc[0]
            for stat, label in (("r2", "R²"), ("rmse", "RMSE"), ("mae", "MAE")):
                for model, predictor in (
                    ("layer", "Layer"),
                    ("trace", "Tracing Effect"),
                    ("both", "Both"),
                ):
                    out.append(
                        {
                            "Method": method_label(method),
                            "Edit Metric": metric_label(metric),
                            "Regression Metric": label,
                            "Predictor(s)": predictor,
                            "Value": float(row[f"{stat}_{model}"]),
                        }
                    )
    return Table(name, title, pd.DataFrame(out), notes=_reason_notes(rows))


def specificity_table(an: Analysis) -> Table | str:
    """Neighbourhood score (Sec. 3.4, higher is better) beside CounterFact+'s neighbourhood KL
    (Hoelscher-Obermaier et al. 2023, lower is better): means over successful edits per
    problem, method and layer (README, "Neighbourhood KL")."""
    means = specificity_means(an.results, an.main_dataset)
    if means.empty:
        return (
            "Neighbourhood KL table skipped: no edit has a neighbourhood KL "
            "(edit.neighborhood_kl.enabled is off)."
        )
    means = means.assign(
        _p=means["problem"].map(problem_rank), _m=means["method"].map(method_rank)
    ).sort_values(["_p", "_m", "layer"])
    frame = pd.DataFrame(
        {
            "Editing Problem": means["problem"].map(problem_label).to_numpy(),
            "Method": means["method"].map(method_label).to_numpy(),
            "Layer": means["layer"].astype(int).to_numpy(),
            "Edits": means["n"].astype(int).to_numpy(),
            "Neighborhood Score (higher better)": means["neighborhood_score"].to_numpy(),
            "Neighborhood KL (lower better)": means["neighborhood_kl"].to_numpy(),
        }
    )
    title = (
        "Neighbourhood score and neighbourhood KL (CounterFact+) by edit layer, "
        f"mean over successful edits ({an.main_dataset})"
    )
    return Table(
        "neighborhood_kl",
        title,
        frame,
        int_columns=("Layer", "Edits"),
        sci_columns=("Neighborhood KL (lower better)",),
        notes=[
            "Neighbourhood KL: KL divergence of the next-token distribution on the neighbour "
            "prompts (prefixed with the edit, CounterFact+) between the unedited and edited "
            "model, settings in edit.neighborhood_kl; not regressed on layer or trace."
        ],
    )


def random_baseline_table(an: Analysis) -> Table | str:
    """Tracing-chosen vs. default vs. random edit layer (beyond the paper; Wang & Veitch 2025)."""
    rb = an.random_baseline
    if rb is None:
        return "Random-location baseline skipped: analysis.random_baseline.enabled is false."
    if rb.frame.empty:
        return f"Random-location baseline skipped: {'; '.join(rb.notes) or 'no conditions'}."
    return Table(
        "random_baseline",
        f"Random-location baseline: edit success at the tracing-chosen, default and a random layer ({an.main_dataset})",
        baseline.display_frame(rb.frame),
        p_columns=("p (draws)",),
        ci_pairs=baseline.interval_columns(an.config.ci_level),
        int_columns=("Facts", "Default layer"),
        notes=baseline.table_notes(rb, an.config),
    )


def all_tables(an: Analysis) -> tuple[list[Table], list[str]]:
    """Every table the inputs support, and a note for each one skipped."""
    tables: list[Table] = []
    notes: list[str] = []

    def add(item: Table | str) -> None:
        (tables if isinstance(item, Table) else notes).append(item)

    add(table1(an))
    add(table2(an))
    for name, metric in METRIC_TABLES.items():
        add(metric_table(an, name, metric))
    add(specificity_table(an))
    add(
        error_table(
            an,
            "table7",
            an.main_dataset,
            f"Table 7: regression error metrics, Error Injection ({an.main_dataset})",
        )
    )
    has_zsre = ZSRE in set(an.results["dataset"])
    if has_zsre:
        add(error_table(an, "table8", ZSRE, "Table 8: zsRE regression results, Error Injection"))
    else:
        notes.append(
            "Table 8 skipped: the results have no zsRE rows (run the edit stage with data=zsre)."
        )
    add(random_baseline_table(an))
    return tables, notes


def write_tables(an: Analysis, directory: Path) -> tuple[list[Table], list[Path], list[str]]:
    """Write every table as CSV and Markdown, plus the full regression and correlation tables."""
    directory.mkdir(parents=True, exist_ok=True)
    tables, notes = all_tables(an)
    paths: list[Path] = []
    for table in tables:
        paths += table.write(directory)
    if not an.regressions.empty:
        an.regressions.to_csv(directory / "regressions.csv", index=False)
        paths.append(directory / "regressions.csv")
    if not an.correlations.empty:
        an.correlations.to_csv(directory / "layer_correlations.csv", index=False)
        paths.append(directory / "layer_correlations.csv")
    if an.concentration is not None:
        an.concentration.to_csv(directory / "concentrated_facts.csv", index=False)
        paths.append(directory / "concentrated_facts.csv")
    return tables, paths, notes
