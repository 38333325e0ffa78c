"""The STR tracing variant of the analysis (symmetric token replacement, Zhang & Nanda 2024):
its own regressions, robustness row and figure when effects.parquet has tracing_str rows, and
a note (no crash) when it has none."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from locedit.analysis import AnalysisConfig, analyze, write_report
from locedit.analysis.synthetic import synthetic_effects, synthetic_results


def _with_str(effects: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """STR rows: the Gaussian tracing curves, perturbed (a different corruption, same facts)."""
    rng = np.random.default_rng(seed)
    swap = effects[effects["method"] == "tracing"].copy()
    swap["method"] = "tracing_str"
    swap["effect_max"] = swap["effect_max"] + 0.05 * rng.standard_normal(len(swap))
    return pd.concat([effects, swap], ignore_index=True)


@pytest.fixture(scope="module")
def data():
    effects = synthetic_effects(n_facts=16, n_model_layers=8, zeroing=False, seed=2)
    results = synthetic_results(
        effects, edit_layers=(1, 3, 5), methods=("rome",), trace_effect=0.8, seed=3
    )
    return effects, results


def test_str_variant_uses_the_str_rows(data, tmp_path):
    effects, results = data
    effects = _with_str(effects)
    cfg = AnalysisConfig(bootstrap_samples=0, mixed_effects=False, variants=("str",))
    an = analyze(effects, results, cfg)
    assert "str" in an.variants and an.variants["str"].spec.method == "tracing_str"
    assert "symmetric token replacement" in an.variants["str"].label()
    main = an.regression("main", "counterfact", "rome", "error_injection", "rewrite_score")
    swap = an.regression("str", "counterfact", "rome", "error_injection", "rewrite_score")
    assert swap is not None and swap["n"] == main["n"]
    # The regressor really is the STR effect: a different (noisier) fit than the main one.
    assert swap["r2_trace"] != pytest.approx(main["r2_trace"], abs=1e-9)
    joined = an.joined["str"].sort_values(["fact_id", "layer"])
    str_rows = effects[effects["method"] == "tracing_str"].set_index(["fact_id", "layer"])
    expected = str_rows.loc[list(zip(joined.fact_id, joined.layer, strict=True)), "effect_max"]
    np.testing.assert_allclose(joined["trace"].to_numpy(), expected.to_numpy())
    write_report(an, tmp_path, "tiny")
    summary = (tmp_path / "summary.md").read_text()
    assert "symmetric token replacement" in summary  # its robustness row
    assert list(tmp_path.rglob("fig_str_r2_layer_vs_trace.png"))


def test_str_variant_is_absent_with_a_note_without_str_rows(data):
    effects, results = data
    cfg = AnalysisConfig(bootstrap_samples=0, mixed_effects=False)
    assert "str" in cfg.variants  # on by default, harmless without STR rows
    an = analyze(effects, results, cfg)
    assert "str" not in an.variants
    assert any(n.startswith("STR variant skipped") for n in an.notes)
