"""The paper's figures as PNG files (Figs. 1, 4, 6-9, 12, 14-22), each with readable axis labels.

Every figure function returns the path it wrote, or a note saying why its inputs are absent.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from locedit.analysis.data import join_trace, trace_table  # noqa: E402
from locedit.analysis.labels import (  # noqa: E402
    method_label,
    metric_label,
    problem_label,
    sort_methods,
    sort_problems,
)
from locedit.analysis.regression import pearson  # noqa: E402
from locedit.analysis.study import MAIN, ZSRE, Analysis  # noqa: E402

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


def _stat_text(x: np.ndarray, y: np.ndarray) -> str:
    r, p, why = pearson(x, y)
    if not math.isfinite(r):
        return f"ρ n/a ({why})"
    p_text = "p < 1e-4" if p < 1e-4 else f"p = {p:.3g}"
    return f"ρ = {r:.2f}, {p_text}"


def _perfect_line(ax, lo: float = 0.0, hi: float = 1.0) -> None:
    ax.plot([lo, hi], [lo, hi], "r--", lw=1.2, label="perfect relationship")


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
        f"{title}\nlayer {layer}: {_stat_text(x, y)}, n = {np.isfinite(y).sum()}", fontsize=10
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
    ax.set_xlabel("Layer of the peak tracing effect")
    ax.set_ylabel("Number of facts")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _layout(fig, top=0.6)
    return _save(fig, path)


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


def all_figures(an: Analysis, directory: Path) -> tuple[list[Path], list[str]]:
    """Draw every figure the inputs support; return the files and a note per figure skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    notes: list[str] = []
    model_trace = an.config.trace.label()
    ds = an.main_dataset

    if not an.curves.empty:
        paths.append(
            argmax_histogram(
                an.curves,
                directory / "fig01_peak_layer.png",
                f"Fig. 1: layer of each fact's peak effect\n({model_trace})",
            )
        )
    else:
        notes.append("Fig. 1 skipped: no tracing effects for the main trace specification.")

    rome = _condition(an, MAIN, ds, "rome", "error_injection")
    layer = default_figure_layer(an)
    if _has(rome, "rewrite_score") and layer is not None:
        paths.append(
            score_vs_trace(
                rome,
                "rewrite_score",
                layer,
                directory / "fig04_rome_rewrite_vs_trace.png",
                "Fig. 4: ROME rewrite score vs. tracing effect",
            )
        )
    else:
        notes.append(
            "Fig. 4 skipped: no ROME / Error Injection rewrite scores joined with tracing effects."
        )

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

    ok = an.results[(an.results["status"] == "ok") & (an.results["dataset"] == ds)]
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

    if layer is not None:
        unscaled = _unscaled(an)
        if _has(unscaled, "rome_rewrite_prob_diff"):
            paths.append(
                score_vs_trace(
                    unscaled,
                    "rome_rewrite_prob_diff",
                    layer,
                    directory / "fig14_rome_unscaled.png",
                    "Fig. 14: ROME rewrite magnitude vs. absolute last-subject tracing effect",
                    xlabel="Absolute tracing effect (last subject token)",
                )
            )
        else:
            notes.append(
                "Fig. 14 skipped: no ROME unscaled rewrite metric or last-subject effects."
            )

    grids = (
        (
            15,
            MAIN,
            ds,
            "rome",
            "error_injection",
            "rewrite_score",
            "ROME rewrite score vs. tracing effect per layer",
            "Tracing effect",
        ),
        (
            16,
            "last_subject",
            ds,
            "rome",
            "error_injection",
            "rewrite_score",
            "ROME rewrite score vs. last-subject-token tracing effect",
            "Tracing effect (last subject token)",
        ),
        (
            17,
            MAIN,
            ds,
            "ft5",
            "fact_forcing",
            "rewrite_score",
            "FT-5 Fact Forcing rewrite score vs. tracing effect",
            "Tracing effect",
        ),
        (
            18,
            MAIN,
            ds,
            "rome",
            "error_injection",
            "overall_score",
            "ROME overall score vs. tracing effect",
            "Tracing effect",
        ),
        (
            19,
            MAIN,
            ZSRE,
            "rome",
            "error_injection",
            "rewrite_score",
            "zsRE: ROME rewrite score vs. tracing effect",
            "Tracing effect",
        ),
        (
            20,
            MAIN,
            ZSRE,
            "rome",
            "error_injection",
            "overall_score",
            "zsRE: ROME overall score vs. tracing effect",
            "Tracing effect",
        ),
        (
            21,
            "zeroing",
            ds,
            "rome",
            "error_injection",
            "rewrite_score",
            "ROME rewrite score vs. representation zeroing effect",
            "Zeroing effect",
        ),
        (
            22,
            "zeroing",
            ds,
            "rome",
            "error_injection",
            "overall_score",
            "ROME overall score vs. representation zeroing effect",
            "Zeroing effect",
        ),
    )
    for number, variant, dataset, method, problem, metric, title, xlabel in grids:
        data = _condition(an, variant, dataset, method, problem)
        if _has(data, metric):
            slug = f"fig{number}_{variant}_{dataset}_{method}_{problem}_{metric}".replace(
                "_score", ""
            )
            paths.append(
                per_layer_scatter(
                    data, metric, directory / f"{slug}.png", f"Fig. {number}: {title}", xlabel
                )
            )
        else:
            notes.append(
                f"Fig. {number} skipped: no {method_label(method)} / {problem_label(problem)} {metric_label(metric).lower()} "
                f"rows for variant '{variant}' on dataset {dataset}."
            )
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
