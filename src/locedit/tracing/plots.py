"""The paper's tracing figures: per-fact heatmap (Fig. 2), layer curve (Fig. 1 style),
window-size comparison (Figs. 10-11), the zeroing curve (App. B), and Gaussian noise vs.
symmetric token replacement (Zhang & Nanda 2024) when both corruptions were traced."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from locedit.tracing.replacement import STR_METHOD  # noqa: E402
from locedit.tracing.results import TraceResult  # noqa: E402

KIND_LABEL = {"mlp": "MLP", "attn": "attention", "resid": "residual stream"}


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_fact_heatmap(result: TraceResult, path: Path) -> Path:
    """Fig. 2: p(o_true) after restoring each (token, layer window); * marks noised tokens."""
    labels = [
        f"{tok!r}*" if result.subject_start <= i < result.subject_end else repr(tok)
        for i, tok in enumerate(result.tokens)
    ]
    fig, ax = plt.subplots(figsize=(0.35 * result.n_layers + 2.5, 0.32 * len(labels) + 1.6))
    image = ax.imshow(
        result.p_restored,
        cmap="Purples",
        aspect="auto",
        vmin=min(result.p_noised, result.p_restored.min()),
    )
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(result.n_layers))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(f"centre of restored {KIND_LABEL[result.kind]} layers (window {result.window})")
    flag = "  [low p_clean - p_noised]" if result.low_denominator else ""
    swap = " (symmetric token replacement)" if result.method == STR_METHOD else ""
    ax.set_title(
        f"Causal Tracing{swap}, fact {result.fact_id}{flag}\n"
        f"p(o|s,r) = {result.p_clean:.3g}, p(o|s_noise,r) = {result.p_noised:.3g}",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="p(o_true) with restoration")
    return _save(fig, path)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _mean_ci(values: pd.Series) -> tuple[float, float]:
    values = values.dropna()
    if len(values) == 0:
        return float("nan"), float("nan")
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return float(values.mean()), float(half)


def _mean_band(part: pd.DataFrame, column: str, layers: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per layer, the mean of ``column`` and the half-width of its 95% interval."""
    stats = [_mean_ci(part[part.layer == layer][column]) for layer in layers]
    return np.array([s[0] for s in stats]), np.array([s[1] for s in stats])


def _usable(table: pd.DataFrame, method: str, kind: str) -> pd.DataFrame:
    part = table[(table.method == method) & (table.kind == kind)]
    return part[~part.low_denominator]


def peak_layers(part: pd.DataFrame) -> pd.Series:
    """Per (fact, window): the layer where effect_max peaks (the tracing curve's argmax)."""
    part = part.dropna(subset=["effect_max"])
    idx = part.groupby(["fact_id", "window"])["effect_max"].idxmax()
    return part.loc[idx].set_index(["fact_id", "window"])["layer"]


def plot_layer_curve(
    table: pd.DataFrame,
    kind: str,
    window: int,
    n_layers: int,
    path: Path,
    method: str = "tracing",
) -> Path:
    """Fig. 1 style: share of facts peaking at each layer, and the mean effect with a 95% band
    (``method`` ``tracing_str``: the same for symmetric token replacement)."""
    part = _usable(table, method, kind)
    part = part[part.window == window]
    layers = np.arange(n_layers)
    mean, half = _mean_band(part, "effect_max", layers)
    peaks = peak_layers(part)
    share = np.bincount(peaks.to_numpy(dtype=int), minlength=n_layers)[:n_layers] / max(
        1, len(peaks)
    )
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(layers, share, color="#c7c1e3", label="share of facts peaking at layer")
    ax.plot(
        layers,
        mean,
        color="#4b3b8f",
        marker="o",
        ms=3,
        label="mean tracing effect (max over tokens)",
    )
    ax.fill_between(layers, mean - half, mean + half, color="#4b3b8f", alpha=0.2, label="95% CI")
    ax.set_xlabel("layer (centre of window)")
    ax.set_ylabel("fraction / fractional effect")
    ax.set_ylim(
        min(0.0, np.nanmin(mean - half) if len(part) else 0.0),
        max(1.0, np.nanmax(mean + half) if len(part) else 1.0),
    )
    what = "symmetric token replacement" if method == STR_METHOD else "Gaussian noise"
    ax.set_title(
        f"Causal Tracing of {KIND_LABEL[kind]} outputs, window {window}, {what} "
        f"({len(peaks)} facts)",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def plot_corruption_comparison(
    table: pd.DataFrame, kind: str, window: int, n_layers: int, path: Path
) -> Path:
    """Mean tracing effect by layer under Gaussian noise and under symmetric token replacement,
    each with its 95% band, on the facts both traced (and neither flagged)."""
    gauss, swap = _usable(table, "tracing", kind), _usable(table, STR_METHOD, kind)
    gauss, swap = gauss[gauss.window == window], swap[swap.window == window]
    common = set(gauss.fact_id) & set(swap.fact_id)
    layers = np.arange(n_layers)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for part, label, colour in (
        (gauss, "Gaussian noise (paper §3.2)", "#4b3b8f"),
        (swap, "symmetric token replacement", "#d95f02"),
    ):
        mean, half = _mean_band(part[part.fact_id.isin(common)], "effect_max", layers)
        ax.plot(layers, mean, marker="o", ms=3, color=colour, label=label)
        ax.fill_between(layers, mean - half, mean + half, color=colour, alpha=0.2)
    ax.set_xlabel("layer (centre of window)")
    ax.set_ylabel("mean tracing effect (max over tokens)")
    ax.set_title(
        f"Corruption: {KIND_LABEL[kind]} tracing, window {window} ({len(common)} facts)",
        fontsize=10,
    )
    _legend(ax)
    return _save(fig, path)


def plot_window_comparison(table: pd.DataFrame, kind: str, n_layers: int, path: Path) -> Path:
    """Figs. 10-11: mean effect by layer per window size, and where the curves peak."""
    part = _usable(table, "tracing", kind)
    windows = sorted(part.window.unique())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    peaks = peak_layers(part)
    for window in windows:
        sub = part[part.window == window]
        curve = sub.groupby("layer").effect_max.mean().reindex(range(n_layers))
        left.plot(curve.index, curve.values, marker="o", ms=3, label=f"window {window}")
        window_peaks = peaks.xs(window, level="window") if len(peaks) else peaks
        right.hist(
            window_peaks, bins=np.arange(n_layers + 1) - 0.5, alpha=0.5, label=f"window {window}"
        )
    left.set_xlabel("layer")
    left.set_ylabel("mean tracing effect")
    left.set_title("Tracing effect grows with window size (Fig. 10)", fontsize=10)
    right.set_xlabel("layer where the tracing curve peaks")
    right.set_ylabel("facts")
    right.set_title("Peak layers by window size (Fig. 11)", fontsize=10)
    for ax in (left, right):
        _legend(ax)
    return _save(fig, path)


def plot_zeroing_curve(table: pd.DataFrame, kind: str, n_layers: int, path: Path) -> Path:
    """App. B: fraction of p_clean deleted by zeroing the subject tokens, by layer."""
    part = _usable(table, "zeroing", kind)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    layers = np.arange(n_layers)
    for window in sorted(part.window.unique()):
        sub = part[part.window == window]
        for column, style in (("effect_max", "-"), ("effect_last_subject", "--")):
            mean, half = _mean_band(sub, column, layers)
            label = "all subject tokens" if column == "effect_max" else "last subject token"
            ax.plot(layers, mean, style, marker="o", ms=3, label=f"window {window}, {label}")
            ax.fill_between(layers, mean - half, mean + half, alpha=0.15)
    ax.set_xlabel("layer (centre of window)")
    ax.set_ylabel("fraction of p(o_true) deleted")
    ax.set_title(
        f"Representation zeroing of {KIND_LABEL[kind]} outputs ({part.fact_id.nunique()} facts)",
        fontsize=10,
    )
    _legend(ax)
    return _save(fig, path)
