"""Figure layout defects of issue 27.6: the random-location band is drawn whole with the p labels
off the data, fig01 counts facts in whole numbers, correlations are named r as in the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from locedit.analysis import AnalysisConfig, analyze, baseline_figure, figures, plots
from locedit.analysis.synthetic import synthetic_effects, synthetic_results


@pytest.fixture(scope="module")
def analysis():
    effects = synthetic_effects(n_facts=5, n_model_layers=18, seed=1, zeroing=False)
    results = synthetic_results(
        effects, (0, 5, 9, 17), methods=("rome", "memit"), trace_effect=0.5, noise=0.1, seed=2
    )
    return analyze(effects, results, AnalysisConfig(bootstrap_samples=50, variants=()))


@pytest.fixture
def drawn(monkeypatch):
    """The figures as drawn, keyed by file name, instead of PNGs."""
    out = {}

    def keep(fig, path: Path) -> Path:
        out[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    monkeypatch.setattr(baseline_figure, "_save", keep)
    yield out
    for fig in out.values():
        plots.plt.close(fig)


def test_random_baseline_band_is_whole_and_p_labels_sit_under_the_method(analysis, drawn, tmp_path):
    baseline_figure.random_baseline_figure(analysis, tmp_path)
    fig = drawn[baseline_figure.FIGURE]
    frame = analysis.random_baseline.frame
    metrics = list(dict.fromkeys(frame["metric"]))  # one row of panels per metric, one problem
    assert len(fig.axes) == len(metrics)
    for ax, metric in zip(fig.axes, metrics, strict=True):
        part = frame[frame["metric"] == metric].set_index("method")
        bottom, top = ax.get_ylim()
        assert bottom < part["random_draw_lo"].min() and top > part["random_draw_hi"].max()
        assert not ax.texts  # nothing written over the data
        labels = [t.get_text() for t in ax.get_xticklabels()]
        expected = [
            f"p={p:.2g}" if p >= 1e-3 else "p<1e-3" for p in part.loc[["rome", "memit"], "p_random"]
        ]
        assert [label.splitlines()[-1] for label in labels] == expected


def test_fig01_counts_facts_in_whole_numbers(analysis, drawn, tmp_path):
    figures.all_figures(analysis, tmp_path)
    ax = drawn["fig01_peak_layer.png"].axes[0]
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_correlations_are_named_r_as_in_the_summary(analysis, drawn, tmp_path):
    figures.all_figures(analysis, tmp_path)
    titles = [
        ax.get_title() for fig in drawn.values() for ax in fig.axes
    ] + [fig._suptitle.get_text() for fig in drawn.values() if fig._suptitle is not None]
    assert not [t for t in titles if "ρ" in t]
    fig04 = drawn["fig04_rome_rewrite_vs_trace.png"].axes[0].get_title()
    assert "Pearson r = " in fig04
    assert plots._stat_text(np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 2.5])).startswith("r = ")
