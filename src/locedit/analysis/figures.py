"""The paper's figures as PNG files (Figs. 1, 4, 6-9, 12, 14-22), each with readable axis labels.

Every figure is drawn when its inputs are present; otherwise a note says why it is absent.
One small function per figure (or family of figures), and :data:`PER_LAYER_FIGURES` lists the
per-layer scatter grids (Figs. 15-22) as data. The drawing lives in
:mod:`locedit.analysis.plots`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from locedit.analysis.baseline_figure import random_baseline_figure
from locedit.analysis.data import join_trace, trace_table
from locedit.analysis.labels import method_label, metric_label, problem_label
from locedit.analysis.plots import (
    argmax_histogram,
    per_layer_scatter,
    r2_bars,
    score_vs_trace,
    scores_by_layer,
)
from locedit.analysis.study import MAIN, ZSRE, Analysis

#: What one figure builder returns: the files it wrote and a note per figure it skipped.
Drawn = tuple[list[Path], list[str]]


def default_figure_layer(
    an: Analysis, method: str = "rome", problem: str = "error_injection"
) -> int | None:
    """The layer of Fig. 4: ``analysis.figure_layer`` if edited, else the middle of the layer grid."""
    data = an.joined.get(MAIN)
    if data is None or data.empty:
        return None
    sel = data[
        (data["method"] == method)
        & (data["problem"] == problem)
        & (data["dataset"] == an.main_dataset)
    ]
    layers = sorted(sel["layer"].unique()) if not sel.empty else sorted(data["layer"].unique())
    if an.config.figure_layer is not None and an.config.figure_layer in layers:
        return int(an.config.figure_layer)
    return int(layers[(len(layers) - 1) // 2]) if layers else None


def _condition(
    an: Analysis, variant: str, dataset: str | None, method: str, problem: str
) -> pd.DataFrame:
    data = an.joined.get(variant)
    if data is None or data.empty:
        return pd.DataFrame()
    return data[
        (data["dataset"] == dataset) & (data["method"] == method) & (data["problem"] == problem)
    ]


def _has(data: pd.DataFrame, metric: str) -> bool:
    return not data.empty and metric in data and bool(np.isfinite(data[metric].astype(float)).any())


def _fig01_peak_layer(an: Analysis, directory: Path) -> Drawn:
    if an.curves.empty:
        return [], ["Fig. 1 skipped: no tracing effects for the main trace specification."]
    title = f"Fig. 1: layer of each fact's peak effect\n({an.config.trace.label()})"
    return [argmax_histogram(an.curves, directory / "fig01_peak_layer.png", title)], []


def _fig04_rome_vs_trace(an: Analysis, directory: Path) -> Drawn:
    rome = _condition(an, MAIN, an.main_dataset, "rome", "error_injection")
    layer = default_figure_layer(an)
    if not (_has(rome, "rewrite_score") and layer is not None):
        return [], [
            "Fig. 4 skipped: no ROME / Error Injection rewrite scores joined with tracing effects."
        ]
    path = score_vs_trace(
        rome,
        "rewrite_score",
        layer,
        directory / "fig04_rome_rewrite_vs_trace.png",
        "Fig. 4: ROME rewrite score vs. tracing effect",
    )
    return [path], []


def _figs06_12_r2(an: Analysis, directory: Path) -> Drawn:
    paths, notes = [], []
    main_rewrite = _regression_slice(an, MAIN, "rewrite_score")
    if not main_rewrite.empty:
        paths.append(
            r2_bars(
                main_rewrite,
                directory / "fig06_r2_layer_vs_trace.png",
                "Fig. 6: R² of rewrite score, edit layer vs. layer + tracing effect",
            )
        )
    else:
        notes.append("Fig. 6 skipped: no rewrite-score regressions.")
    str_rewrite = _regression_slice(an, "str", "rewrite_score") if "str" in an.variants else None
    if str_rewrite is not None and not str_rewrite.empty:
        paths.append(
            r2_bars(
                str_rewrite,
                directory / "fig_str_r2_layer_vs_trace.png",
                "R² of rewrite score, edit layer vs. layer + tracing effect\n"
                "(tracing with symmetric token replacement)",
            )
        )
    for name in an.variants:
        if name.startswith("window_"):
            part = _regression_slice(an, name, "rewrite_score")
            if not part.empty:
                w = name.removeprefix("window_")
                paths.append(
                    r2_bars(
                        part,
                        directory / f"fig12_r2_window{w}.png",
                        f"Fig. 12: R² of rewrite score with tracing window {w}",
                    )
                )
    return paths, notes


def _figs07_09_scores_by_layer(an: Analysis, directory: Path) -> Drawn:
    paths, notes = [], []
    ok = an.results[(an.results["status"] == "ok") & (an.results["dataset"] == an.main_dataset)]
    ei = ok[ok["problem"] == "error_injection"]
    for number, metrics, what in (
        (7, ["rewrite_score", "paraphrase_score", "neighborhood_score"], "edit success"),
        (8, ["essence_score"], "essence score"),
        (9, ["overall_score", "overall_score_with_essence"], "overall score"),
    ):
        present = [m for m in metrics if _has(ei, m)]
        if present:
            paths.append(
                scores_by_layer(
                    ei,
                    present,
                    directory / f"fig{number:02d}_{what.replace(' ', '_')}_by_layer.png",
                    f"Fig. {number}: {what} by edit layer, Error Injection",
                )
            )
        else:
            notes.append(f"Fig. {number} skipped: no {what} values for Error Injection.")
    return paths, notes


def _fig14_rome_unscaled(an: Analysis, directory: Path) -> Drawn:
    layer = default_figure_layer(an)
    if layer is None:
        return [], []
    unscaled = _unscaled(an)
    if not _has(unscaled, "rome_rewrite_prob_diff"):
        return [], ["Fig. 14 skipped: no ROME unscaled rewrite metric or last-subject effects."]
    path = score_vs_trace(
        unscaled,
        "rome_rewrite_prob_diff",
        layer,
        directory / "fig14_rome_unscaled.png",
        "Fig. 14: ROME rewrite magnitude vs. absolute last-subject tracing effect",
        xlabel="Absolute tracing effect (last subject token)",
    )
    return [path], []


class PerLayerFigure(NamedTuple):
    """One of the paper's per-layer scatter grids (App. C-D): which rows, which score."""

    number: int
    variant: str  # trace variant (MAIN, last_subject, zeroing)
    dataset: str | None  # None: the main data set
    method: str
    problem: str
    metric: str
    title: str
    xlabel: str = "Tracing effect"


#: Figs. 15-22 of the paper.
PER_LAYER_FIGURES: tuple[PerLayerFigure, ...] = (
    PerLayerFigure(
        15,
        MAIN,
        None,
        "rome",
        "error_injection",
        "rewrite_score",
        "ROME rewrite score vs. tracing effect per layer",
    ),
    PerLayerFigure(
        16,
        "last_subject",
        None,
        "rome",
        "error_injection",
        "rewrite_score",
        "ROME rewrite score vs. last-subject-token tracing effect",
        "Tracing effect (last subject token)",
    ),
    PerLayerFigure(
        17,
        MAIN,
        None,
        "ft5",
        "fact_forcing",
        "rewrite_score",
        "FT-5 Fact Forcing rewrite score vs. tracing effect",
    ),
    PerLayerFigure(
        18,
        MAIN,
        None,
        "rome",
        "error_injection",
        "overall_score",
        "ROME overall score vs. tracing effect",
    ),
    PerLayerFigure(
        19,
        MAIN,
        ZSRE,
        "rome",
        "error_injection",
        "rewrite_score",
        "zsRE: ROME rewrite score vs. tracing effect",
    ),
    PerLayerFigure(
        20,
        MAIN,
        ZSRE,
        "rome",
        "error_injection",
        "overall_score",
        "zsRE: ROME overall score vs. tracing effect",
    ),
    PerLayerFigure(
        21,
        "zeroing",
        None,
        "rome",
        "error_injection",
        "rewrite_score",
        "ROME rewrite score vs. representation zeroing effect",
        "Zeroing effect",
    ),
    PerLayerFigure(
        22,
        "zeroing",
        None,
        "rome",
        "error_injection",
        "overall_score",
        "ROME overall score vs. representation zeroing effect",
        "Zeroing effect",
    ),
)


def _figs15_22_per_layer(an: Analysis, directory: Path) -> Drawn:
    paths, notes = [], []
    for fig in PER_LAYER_FIGURES:
        dataset = fig.dataset if fig.dataset is not None else an.main_dataset
        data = _condition(an, fig.variant, dataset, fig.method, fig.problem)
        if _has(data, fig.metric):
            slug = (
                f"fig{fig.number}_{fig.variant}_{dataset}_{fig.method}_{fig.problem}_{fig.metric}"
            )
            paths.append(
                per_layer_scatter(
                    data,
                    fig.metric,
                    directory / f"{slug.replace('_score', '')}.png",
                    f"Fig. {fig.number}: {fig.title}",
                    fig.xlabel,
                )
            )
        else:
            notes.append(
                f"Fig. {fig.number} skipped: no {method_label(fig.method)} / "
                f"{problem_label(fig.problem)} {metric_label(fig.metric).lower()} "
                f"rows for variant '{fig.variant}' on dataset {dataset}."
            )
    return paths, notes


#: Every figure builder, in the paper's order.
FIGURES: tuple[Callable[[Analysis, Path], Drawn], ...] = (
    _fig01_peak_layer,
    _fig04_rome_vs_trace,
    _figs06_12_r2,
    _figs07_09_scores_by_layer,
    _fig14_rome_unscaled,
    _figs15_22_per_layer,
    random_baseline_figure,  # beyond the paper
)


def all_figures(an: Analysis, directory: Path) -> Drawn:
    """Draw every figure the inputs support; return the files and a note per figure skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    notes: list[str] = []
    for draw in FIGURES:
        drawn, skipped = draw(an, directory)
        paths.extend(drawn)
        notes.extend(skipped)
    return paths, notes


def _regression_slice(an: Analysis, variant: str, metric: str) -> pd.DataFrame:
    r = an.regressions
    if r.empty:
        return r
    return r[
        (r["variant"] == variant) & (r["dataset"] == an.main_dataset) & (r["metric"] == metric)
    ]


def _unscaled(an: Analysis) -> pd.DataFrame:
    """ROME / Error Injection rows with ROME's absolute last-subject tracing effect (Fig. 14)."""
    spec = replace(an.config.trace, statistic="absolute_last_subject")
    trace = trace_table(an.effects, spec)
    if trace.empty:
        return pd.DataFrame()
    rows = an.results[
        (an.results["method"] == "rome")
        & (an.results["problem"] == "error_injection")
        & (an.results["dataset"] == an.main_dataset)
    ]
    data, _ = join_trace(rows, trace, an.config.drop_low_denominator)
    return data
