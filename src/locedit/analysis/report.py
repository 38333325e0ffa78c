"""Write reports/ (tables, figures, summary.md) and the R² values as flat MLflow metrics."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

from locedit.analysis import random_baseline
from locedit.analysis.figures import all_figures
from locedit.analysis.specificity import specificity_means
from locedit.analysis.study import MAIN, Analysis
from locedit.analysis.summary import summary_markdown
from locedit.analysis.tables import write_tables

log = logging.getLogger(__name__)

#: Per-condition statistics logged as MLflow metrics (main variant); other variants log the R² only.
MAIN_METRIC_STATS = (
    "r2_layer",
    "r2_trace",
    "r2_both",
    "added_r2",
    "f_pvalue",
    "rmse_layer",
    "rmse_trace",
    "mae_layer",
    "mae_trace",
    "pearson_r",
    "added_r2_lo",
    "added_r2_hi",
    "mixed_lr_pvalue",
    "mixed_added_r2m",
)
VARIANT_METRIC_STATS = ("r2_layer", "r2_trace", "r2_both", "added_r2", "f_pvalue")


def write_report(an: Analysis, directory: Path, model_name: str) -> list[Path]:
    """Tables (CSV + Markdown), figures (PNG) and summary.md under ``directory``; returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("tables", "figures"):  # no stale table or figure from an earlier run survives
        if (directory / sub).is_dir():
            shutil.rmtree(directory / sub)
    tables, table_paths, table_notes = write_tables(an, directory / "tables")
    (directory / "tables.md").write_text(
        "# Tables\n\n"
        + "\n".join(t.to_markdown() for t in tables)
        + (
            "\n## Skipped\n\n" + "\n".join(f"- {n}" for n in table_notes) + "\n"
            if table_notes
            else ""
        )
    )
    figure_paths, figure_notes = all_figures(an, directory / "figures")
    notes = an.notes + table_notes + figure_notes
    summary = summary_markdown(
        an,
        model_name,
        tables=[f"tables/{p.name}" for p in table_paths if p.suffix == ".md"],
        figures=[f"figures/{p.name}" for p in figure_paths],
        notes=notes,
    )
    (directory / "summary.md").write_text(summary)
    for note in notes:
        log.info("%s", note)
    return [directory / "summary.md", directory / "tables.md", *table_paths, *figure_paths]


def mlflow_metrics(an: Analysis) -> dict[str, float]:
    """``<variant>.<dataset>.<problem>.<method>.<metric>.<stat>`` -> value, finite values only;
    with the neighbourhood KL on, also ``specificity.<dataset>.<problem>.<method>.<column>``:
    mean neighbourhood score and KL over the successful edits (not regressed)."""
    out: dict[str, float] = random_baseline.mlflow_metrics(an.random_baseline)
    for _, row in specificity_means(an.results, an.main_dataset, by_layer=False).iterrows():
        prefix = f"specificity.{an.main_dataset}.{row['problem']}.{row['method']}"
        for column in ("neighborhood_score", "neighborhood_kl"):
            if math.isfinite(float(row[column])):
                out[f"{prefix}.{column}"] = float(row[column])
    if an.regressions.empty:
        return out
    for _, row in an.regressions.iterrows():
        stats = MAIN_METRIC_STATS if row["variant"] == MAIN else VARIANT_METRIC_STATS
        prefix = ".".join(
            str(row[k]) for k in ("variant", "dataset", "problem", "method", "metric")
        )
        for stat in stats:
            value = row.get(stat, math.nan)
            if isinstance(value, int | float) and math.isfinite(float(value)):
                out[f"{prefix}.{stat}"] = float(value)
    return out
