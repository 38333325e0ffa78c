"""The random-location baseline (issue 21.4): tracing-chosen vs. default vs. random edit layer."""

from __future__ import annotations

import itertools
import subprocess
import sys
import zlib

import numpy as np
import pandas as pd
import pytest

from locedit.analysis import AnalysisConfig, analyze
from locedit.analysis.config import RandomBaselineSpec
from locedit.analysis.random_baseline import (
    condition_row,
    fact_choices,
    metrics_tree,
    mlflow_metrics,
    model_depth,
    random_baseline,
    summary_lines,
)
from locedit.analysis.synthetic import synthetic_effects, synthetic_results
from locedit.analysis.tables import random_baseline_table
from locedit.default_layers import scaled_default_layer

#: Three facts with hand-computed choices (default layer 2 of a 9-layer model) and one fact
#: with a single edited layer, which is skipped.
#: A: trace peaks at 4 (0.8); default -> nearest edited layer 1 (0.2); random mean 0.5.
#: B: trace ties at 1 and 4 -> lowest, 1 (0.9); default 1 (0.9); random mean 0.6.
#: C: edited at 1 and 4 only; trace peaks at 1 (0.4); default 1 (0.4); random mean 0.7.
HAND = pd.DataFrame(
    [
        ("A", 1, 0.1, 0.2),
        ("A", 4, 0.5, 0.8),
        ("A", 7, 0.2, 0.5),
        ("B", 1, 0.6, 0.9),
        ("B", 4, 0.6, 0.3),
        ("B", 7, 0.1, 0.6),
        ("C", 1, 0.2, 0.4),
        ("C", 4, 0.1, 1.0),
        ("D", 4, 0.9, 0.7),
    ],
    columns=["fact_id", "layer", "trace", "rewrite_score"],
)


def seed_of(*key: object) -> int:
    return zlib.crc32("|".join(map(str, key)).encode())


def test_default_layer_of_nine_layers_is_two():
    assert scaled_default_layer(9) == 2  # 0.273 x 8 = 2.19
    assert scaled_default_layer(28) == 5 and scaled_default_layer(48) == 17


def test_hand_computed_three_fact_example():
    per_fact, skipped = fact_choices(HAND, "rewrite_score", default_layer=2)
    assert skipped == 1 and list(per_fact["fact_id"]) == ["A", "B", "C"]
    assert list(per_fact["tracing_layer"]) == [4, 1, 1]
    assert list(per_fact["default_layer"]) == [1, 1, 1]
    np.testing.assert_allclose(per_fact["tracing"], [0.8, 0.9, 0.4])
    np.testing.assert_allclose(per_fact["default"], [0.2, 0.9, 0.4])
    np.testing.assert_allclose(per_fact["random"], [0.5, 0.6, 0.7])

    row = condition_row(HAND, "rewrite_score", 2, 20000, 0, 0.95, (1, 2))
    assert row["n_facts"] == 3 and row["n_skipped"] == 1
    assert row["tracing"] == pytest.approx(0.7)
    assert row["default"] == pytest.approx(0.5)
    assert row["random"] == pytest.approx(0.6)
    assert row["diff"] == pytest.approx(0.1)
    assert row["diff_default"] == pytest.approx(0.2)
    assert np.isnan(row["diff_lo"])  # bootstrap off
    # the 3 x 3 x 2 equally likely assignments, enumerated: the exact share at least as good
    options = [[0.2, 0.8, 0.5], [0.9, 0.3, 0.6], [0.4, 1.0]]
    means = [np.mean(pick) for pick in itertools.product(*options)]
    assert np.mean(means) == pytest.approx(0.6)
    share = np.mean([m >= 0.7 - 1e-12 for m in means])
    assert row["p_random"] == pytest.approx(share, abs=0.015)
    assert row["random_mc"] == pytest.approx(0.6, abs=0.005)
    assert row["random_draw_lo"] >= min(means) and row["random_draw_hi"] <= max(means)


def test_default_ties_go_to_the_lower_layer_and_missing_scores_leave_candidates():
    rows = pd.DataFrame(
        {
            "fact_id": ["x"] * 3,
            "layer": [1, 3, 5],
            "trace": [0.1, 0.2, 0.3],
            "rewrite_score": [0.1, 0.2, np.nan],
        }
    )
    per_fact, skipped = fact_choices(rows, "rewrite_score", default_layer=2)
    assert skipped == 0
    assert per_fact.loc[0, "default_layer"] == 1  # 1 and 3 are both one away
    assert per_fact.loc[0, "tracing_layer"] == 3  # 5 has no score, so it is no candidate
    assert per_fact.loc[0, "random"] == pytest.approx(0.15)


def _tables(trace_effect: float, layer_effect: float, noise: float, n_facts: int = 40):
    effects = synthetic_effects(
        n_facts=n_facts, n_model_layers=18, windows=(5,), zeroing=False, seed=11
    )
    results = synthetic_results(
        effects,
        (1, 4, 7, 10, 13, 16),
        methods=("rome",),
        layer_effect=layer_effect,
        trace_effect=trace_effect,
        noise=noise,
        seed=12,
    )
    return effects, results


def _baseline(effects, results, **cfg):
    config = AnalysisConfig(
        bootstrap_samples=cfg.pop("bootstrap_samples", 300),
        mixed_effects=False,
        variants=(),
        metrics=("rewrite_score",),
        **cfg,
    )
    return analyze(effects, results, config)


def test_tracing_beats_random_when_the_peak_is_the_best_layer():
    effects, results = _tables(trace_effect=1.0, layer_effect=0.0, noise=0.01)
    row = _baseline(effects, results).random_baseline.frame
    row = row[row["metric"] == "rewrite_score"].iloc[0]
    assert row["n_facts"] == 40
    assert row["diff"] > 0 and row["diff_lo"] > 0
    assert row["tracing"] > row["random_draw_hi"]
    assert row["p_random"] == pytest.approx(1 / 1001)
    assert row["tracing"] >= row["default"]


def test_summary_counts_conditions_against_random_and_default():
    an = _baseline(*_tables(trace_effect=1.0, layer_effect=0.0, noise=0.01))
    part = an.random_baseline.frame
    part = part[part["metric"] == "rewrite_score"]
    ahead = int((part["diff_default_lo"] > 0).sum())
    behind = int((part["diff_default_hi"] < 0).sum())
    lines = summary_lines(an.random_baseline)
    assert "above 0 in 1, falls below it in 0, and is indistinguishable in 0" in lines[0]
    assert (
        f"default layer it is better in {ahead}, worse in {behind} and indistinguishable in "
        f"{len(part) - ahead - behind}" in lines[1]
    )
    assert "ROME (1 layer), Error Injection: tracing-chosen" in lines[2]


def test_no_difference_when_success_does_not_depend_on_the_layer():
    effects, results = _tables(trace_effect=0.0, layer_effect=0.0, noise=0.05)
    row = _baseline(effects, results).random_baseline.frame
    row = row[row["metric"] == "rewrite_score"].iloc[0]
    assert abs(row["diff"]) < 0.02
    assert row["diff_lo"] < 0 < row["diff_hi"]
    assert row["p_random"] > 0.05
    assert row["random_draw_lo"] < row["tracing"] < row["random_draw_hi"]


def test_random_expectation_is_the_mean_over_edited_layers_and_draws_converge():
    effects, results = _tables(trace_effect=0.3, layer_effect=0.3, noise=0.05, n_facts=30)
    spec = RandomBaselineSpec(draws=4000, metrics=("rewrite_score", "overall_score"))
    an = _baseline(effects, results, random_baseline=spec)
    frame = an.random_baseline.frame
    joined = an.joined["main"]
    for metric in ("rewrite_score", "overall_score"):
        row = frame[frame["metric"] == metric].iloc[0]
        exact = joined.groupby("fact_id")[metric].mean().mean()
        assert row["random"] == pytest.approx(exact)
        assert row["random_mc"] == pytest.approx(exact, abs=0.003)
        assert row["random_lo"] < row["random"] < row["random_hi"]


def test_seeded_draws_are_reproducible_and_the_seed_moves_only_the_draws():
    effects, results = _tables(trace_effect=0.3, layer_effect=0.3, noise=0.05, n_facts=20)
    first = _baseline(effects, results, bootstrap_samples=50, seed=3).random_baseline.frame
    again = _baseline(effects, results, bootstrap_samples=50, seed=3).random_baseline.frame
    other = _baseline(effects, results, bootstrap_samples=50, seed=4).random_baseline.frame
    pd.testing.assert_frame_equal(first, again)
    exact = ["tracing", "default", "random", "diff", "diff_default", "n_facts", "peak_edited"]
    pd.testing.assert_frame_equal(first[exact], other[exact])
    assert not np.allclose(first["random_mc"], other["random_mc"])
    assert not np.allclose(first["diff_lo"], other["diff_lo"])


def test_facts_with_one_edited_layer_are_skipped_and_counted():
    effects, results = _tables(trace_effect=0.3, layer_effect=0.3, noise=0.05, n_facts=12)
    drop = results["fact_id"].isin(["f000", "f001"]) & (results["layer"] != 4)
    an = _baseline(effects, results[~drop], bootstrap_samples=20)
    rb = an.random_baseline
    assert list(rb.frame["metric"]) == ["rewrite_score", "overall_score"]  # the default metrics
    assert rb.frame["n_skipped"].tolist() == [2, 2] and rb.frame["n_facts"].tolist() == [10, 10]
    assert any("2 facts" in note for note in rb.notes)
    table = random_baseline_table(an)
    md = table.to_markdown()
    assert "Tracing − random 95% CI" in md and "Random draws 95% range" in md
    assert "2 facts" in md and "edit.layers" in md
    assert rb.n_layers == 18 and rb.default_layer == scaled_default_layer(18) == 5


def test_metrics_for_dvc_and_mlflow():
    effects, results = _tables(trace_effect=0.3, layer_effect=0.3, noise=0.05, n_facts=10)
    rb = _baseline(effects, results, bootstrap_samples=20).random_baseline
    row = rb.frame.iloc[0]
    tree = metrics_tree(rb)["random_baseline"]["error_injection"]["rome"]["rewrite_score"]
    assert tree["diff"] == pytest.approx(row["diff"], abs=1e-6)
    assert tree["n_facts"] == 10
    flat = mlflow_metrics(rb)
    key = "random_baseline.counterfact.error_injection.rome.rewrite_score"
    assert flat[f"{key}.p_random"] == pytest.approx(row["p_random"])
    assert flat[f"{key}.random_mc"] == pytest.approx(row["random_mc"])


def test_disabled_baseline_and_config_checks():
    effects, results = _tables(trace_effect=0.3, layer_effect=0.3, noise=0.05, n_facts=6)
    cfg = AnalysisConfig.from_params(
        {"random_baseline": {"enabled": False}, "bootstrap_samples": 0, "variants": []}
    )
    an = analyze(effects, results, cfg)
    assert an.random_baseline is None
    assert "skipped" in random_baseline_table(an)
    with pytest.raises(ValueError, match="unknown analysis.random_baseline"):
        AnalysisConfig.from_params({"random_baseline": {"draw": 5}})
    with pytest.raises(ValueError, match="not among"):
        RandomBaselineSpec(metrics=("score",))
    with pytest.raises(ValueError, match="draws"):
        RandomBaselineSpec(draws=0)
    follows = AnalysisConfig.from_params({"random_baseline": {"metrics": None}})
    assert follows.random_baseline.metrics is None  # falls back to analysis.metrics


def test_empty_and_depth_edge_cases():
    empty = pd.DataFrame(columns=["fact_id", "layer", "method", "problem", "trace"])
    rb = random_baseline(empty, empty, AnalysisConfig(), None, seed_of)
    assert rb.frame.empty and rb.notes
    assert model_depth(pd.DataFrame({"layer": [0, 8]}), pd.DataFrame({"layer": [4]})) == 9


def test_the_analysis_imports_no_torch():
    code = (
        "import sys, locedit.analysis, locedit.analysis.report, locedit.analysis.random_baseline,"
        " locedit.analysis.baseline_figure, locedit.default_layers;"
        " sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
