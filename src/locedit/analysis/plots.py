"""Drawing the paper's kinds of figure (scatter of score vs. tracing effect, per-layer scatter
grids, R² bars, scores by layer, peak-layer histogram), each to a PNG with readable labels.

:mod:`locedit.analysis.figures` decides which of the paper's figures to draw from what.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from locedit.analysis.labels import (  # noqa: E402
    method_label,
    metric_label,
    problem_label,
    sort_methods,
    sort_problems,
)
from locedit.analysis.regression import pearson  # noqa: E402

log = logging.getLogger(__name__)

DPI = 120
LAYER_COLOR = "#4C72B0"
BOTH_COLOR = "#DD8452"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _layout(
    fig,
    left: float = 0.75,
    right: float = 0.2,
    bottom: float = 0.6,
    top: float = 0.75,
    wspace: float = 0.25,
    hspace: float = 0.6,
) -> None:
    """Fixed margins in inches: much cheaper than tight_layout/bbox_inches="tight" on big grids."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / w,
        right=1 - right / w,
        bottom=bottom / h,
        top=1 - top / h,
        wspace=wspace,
        hspace=hspace,
    )


def _stat_text(x: np.ndarray, y: np.ndarray, name: str = "r") -> str:
    """Pearson's r, named as reports/summary.md names it (the paper's Fig. 4 writes ρ)."""
    r, p, why = pearson(x, y)
    if not math.isfinite(r):
        return f"{name} n/a ({why})"
    p_text = "p < 1e-4" if p < 1e-4 else f"p = {p:.3g}"
    return f"{name} = {r:.2f}, {p_text}"


def _perfect_line(ax, lo: float = 0.0, hi: float = 1.0) -> None:
    ax.plot([lo, hi], [lo, hi], "r--", lw=1.2, label="perfect relationship")


def score_vs_trace(
    data: pd.DataFrame,
    metric: str,
    layer: int,
    path: Path,
    title: str,
    xlabel: str = "Tracing effect",
) -> Path:
    """Edit success vs. tracing effect at one layer, with the perfect-relationship line (Fig. 4)."""
    part = data[data["layer"] == layer]
    x = part["trace"].to_numpy(dtype=float)
    y = part[metric].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    ax.scatter(x, y, s=22, alpha=0.7, color=LAYER_COLOR, edgecolor="none")
    _perfect_line(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(
        f"{title}\nlayer {layer}: {_stat_text(x, y, 'Pearson r')}, n = {np.isfinite(y).sum()}",
        fontsize=10,
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _layout(fig, top=0.65)
    return _save(fig, path)


def per_layer_scatter(
    data: pd.DataFrame, metric: str, path: Path, title: str, xlabel: str = "Tracing effect"
) -> Path:
    """One scatter of edit success vs. tracing effect per edit layer (Figs. 15-22)."""
    layers = sorted(int(x) for x in data["layer"].unique())
    ncols = min(5, max(1, len(layers)))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.0 * ncols, 2.8 * nrows), squeeze=False, sharey=True
    )
    xmax = max(1.0, float(np.nanmax(data["trace"])) if len(data) else 1.0)
    xmin = min(0.0, float(np.nanmin(data["trace"])) if len(data) else 0.0)
    for ax, layer in zip(axes.flat, layers, strict=False):
        part = data[data["layer"] == layer]
        x = part["trace"].to_numpy(dtype=float)
        y = part[metric].to_numpy(dtype=float)
        ax.scatter(x, y, s=14, alpha=0.7, color=LAYER_COLOR, edgecolor="none")
        _perfect_line(ax)
        ax.set_xlim(xmin - 0.05, xmax + 0.05)
        ax.set_title(f"Layer {layer}: {_stat_text(x, y)}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(metric_label(metric))
    for ax in axes[-1, :]:
        ax.set_xlabel(xlabel)
    fig.suptitle(title, fontsize=11)
    _layout(fig, top=0.8)
    return _save(fig, path)


def r2_bars(
    regressions: pd.DataFrame, path: Path, title: str, ylabel: str = "R² of rewrite score"
) -> Path:
    """R² of Layer vs. Layer x Trace per method, one panel per problem (Figs. 6, 12, 13).

    Whiskers: bootstrap intervals over facts, when computed.
    """
    problems = sort_problems(regressions["problem"])
    width = max(6.5, 3.6 * len(problems))
    fig, axes = plt.subplots(1, len(problems), figsize=(width, 4.0), squeeze=False, sharey=True)
    for ax, problem in zip(axes[0], problems, strict=True):
        part = regressions[regressions["problem"] == problem].set_index("method")
        methods = sort_methods(part.index)
        xs = np.arange(len(methods))
        for offset, col, color, label in (
            (-0.2, "r2_layer", LAYER_COLOR, "Layer"),
            (0.2, "r2_both", BOTH_COLOR, "Layer + Trace"),
        ):
            vals = np.array([part.loc[m, col] for m in methods], dtype=float)
            top = vals.copy()
            err = None
            if f"{col}_lo" in part:
                lo = np.array([part.loc[m, f"{col}_lo"] for m in methods], dtype=float)
                hi = np.array([part.loc[m, f"{col}_hi"] for m in methods], dtype=float)
                if np.isfinite(lo).any():
                    err = np.nan_to_num(
                        np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
                    )
                    top = np.fmax(vals, hi)
            ax.bar(
                xs + offset,
                np.nan_to_num(vals),
                width=0.38,
                color=color,
                label=label,
                yerr=err,
                capsize=3,
            )
            for x, v, t in zip(xs + offset, vals, top, strict=True):
                text = f"{v:.2f}" if math.isfinite(v) else "n/a"
                ax.text(x, np.nan_to_num(t) + 0.015, text, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, [method_label(m).replace(" (", "\n(") for m in methods], fontsize=8)
        ax.set_title(problem_label(problem), fontsize=10)
        ax.set_ylim(0, 1.12)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel(ylabel)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=2,
        fontsize=8,
        bbox_to_anchor=(0.5, 1 - 0.45 / 4.0),
    )
    fig.suptitle(title, fontsize=11)
    _layout(fig, bottom=0.75, top=0.95, wspace=0.08)
    return _save(fig, path)


def scores_by_layer(results: pd.DataFrame, metrics: list[str], path: Path, title: str) -> Path:
    """Mean edit score by edit layer per method, with 95% intervals over facts (Figs. 7-9)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for method in sort_methods(results["method"]):
            part = results[results["method"] == method].groupby("layer")[metric]
            mean = part.mean()
            half = 1.96 * part.std(ddof=1).fillna(0) / np.sqrt(part.count().clip(lower=1))
            ax.errorbar(
                mean.index,
                mean.to_numpy(),
                yerr=half.to_numpy(),
                marker="o",
                ms=4,
                capsize=3,
                label=method_label(method),
            )
        ax.set_xticks(sorted(results["layer"].unique()))
        ax.set_xlabel("Edit layer")
        ax.set_ylabel(metric_label(metric))
        ax.set_title(metric_label(metric), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    _layout(fig, top=0.8, wspace=0.35)
    return _save(fig, path)


def argmax_histogram(curves: pd.DataFrame, path: Path, title: str) -> Path:
    """Where facts are localized: the layer of each fact's peak tracing effect (Fig. 1)."""
    finite = curves[np.isfinite(curves["trace"])]
    peaks = finite.loc[finite.groupby("fact_id")["trace"].idxmax(), "layer"]
    layers = sorted(curves["layer"].unique())
    counts = peaks.value_counts().reindex(layers, fill_value=0)
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    ax.bar(counts.index, counts.to_numpy(), color=LAYER_COLOR)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count of facts
    ax.set_xlabel("Layer of the peak tracing effect")
    ax.set_ylabel("Number of facts")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _layout(fig, top=0.6)
    return _save(fig, path)
