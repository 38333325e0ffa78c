"""The random-location baseline as a figure: edit success at the tracing-chosen, default and a
random layer, per method and problem (beyond the paper; Wang & Veitch 2025, arXiv 2502.11447).

The numbers come from :mod:`locedit.analysis.random_baseline`; this module only draws them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from locedit.analysis.labels import (
    method_label,
    metric_label,
    problem_label,
    sort_methods,
    sort_problems,
)
from locedit.analysis.plots import _layout, _save, plt
from locedit.analysis.study import Analysis

FIGURE = "random_baseline.png"
#: (column, legend label, colour, x offset) of the three points per method.
POINTS = (
    ("tracing", "Tracing-chosen layer", "#DD8452", -0.22),
    ("default", "Default layer", "#8C8C8C", 0.0),
    ("random", "Random layer (exact mean)", "#4C72B0", 0.22),
)


def random_baseline_plot(frame: pd.DataFrame, path: Path, title: str, ci_level: float) -> Path:
    """One panel per metric (rows) x problem (columns); per method the three points with their
    bootstrap intervals, the random layer's chance range (seeded draws) as a pale bar, and the
    p-value of tracing vs. random (share of random draws at least as good) below each method."""
    metrics = list(dict.fromkeys(frame["metric"]))
    problems = sort_problems(frame["problem"])
    n_methods = max(len(set(frame["method"])), 1)
    width = max(6.5, (1.2 * n_methods + 1.0) * len(problems))
    height = 3.2 * len(metrics) + 1.4
    fig, axes = plt.subplots(
        len(metrics), len(problems), figsize=(width, height), squeeze=False, sharey="row"
    )
    for i, metric in enumerate(metrics):
        for j, problem in enumerate(problems):
            ax = axes[i, j]
            part = frame[(frame["metric"] == metric) & (frame["problem"] == problem)]
            part = part.set_index("method")
            methods = sort_methods(part.index)
            xs = np.arange(len(methods))
            draw_lo = part.reindex(methods)["random_draw_lo"].to_numpy(dtype=float)
            draw_hi = part.reindex(methods)["random_draw_hi"].to_numpy(dtype=float)
            band = ax.bar(
                xs + POINTS[2][3],
                np.nan_to_num(draw_hi - draw_lo),
                bottom=np.nan_to_num(draw_lo),
                width=0.18,
                color=POINTS[2][2],
                alpha=0.2,
                label=f"Random assignments, {ci_level:.0%} range",
            )
            for patch in band:  # bars stick the axis to their base: the band's foot was cut
                patch.sticky_edges.y.clear()
            for column, label, color, offset in POINTS:
                rows = part.reindex(methods)
                vals = rows[column].to_numpy(dtype=float)
                lo = rows[f"{column}_lo"].to_numpy(dtype=float)
                hi = rows[f"{column}_hi"].to_numpy(dtype=float)
                err = np.nan_to_num(
                    np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
                )
                ax.errorbar(
                    xs + offset, vals, yerr=err, fmt="o", ms=5, capsize=3, color=color, label=label
                )
            ticks = []
            for method in methods:  # p below the method's name, clear of the data
                p = float(part.loc[method, "p_random"])
                label = method_label(method).replace(" (", "\n(")
                if math.isfinite(p):
                    label += "\np<1e-3" if p < 1e-3 else f"\np={p:.2g}"
                ticks.append(label)
            ax.margins(y=0.12)
            ax.set_xticks(xs, ticks, fontsize=8)
            ax.set_xlim(-0.6, len(methods) - 0.4)
            ax.grid(axis="y", alpha=0.3)
            if i == 0:
                ax.set_title(problem_label(problem), fontsize=10)
            if j == 0:
                ax.set_ylabel(f"Mean {metric_label(metric).lower()}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    ncol = 4 if width >= 11 else 2
    legend_rows = math.ceil(len(labels) / ncol)
    top = 0.75 + 0.22 * legend_rows
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=ncol,
        fontsize=8,
        bbox_to_anchor=(0.5, 1 - 0.55 / height),
    )
    fig.suptitle(title, fontsize=10)
    _layout(fig, bottom=0.9, top=top + 0.25, hspace=0.55, wspace=0.08)
    return _save(fig, path)


def random_baseline_figure(an: Analysis, directory: Path) -> tuple[list[Path], list[str]]:
    """The figure builder for :data:`locedit.analysis.figures.FIGURES`."""
    rb = an.random_baseline
    if rb is None:
        return [], [
            "Random-location baseline figure skipped: analysis.random_baseline.enabled is false."
        ]
    frame = rb.frame
    if frame.empty or not np.isfinite(frame["tracing"].astype(float)).any():
        return [], [
            "Random-location baseline figure skipped: no fact has two edited layers with a score."
        ]
    title = (
        "Edit success at the layer tracing picks vs. the default vs. a random layer\n"
        f"({an.main_dataset}; p: share of random draws at least as good)"
    )
    return [random_baseline_plot(frame, directory / FIGURE, title, an.config.ci_level)], []
