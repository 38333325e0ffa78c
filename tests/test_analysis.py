"""Regressions, bootstrap, concentrated subset and join: numbers checked against numpy by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats

from locedit.analysis import (
    AnalysisConfig,
    TraceSpec,
    concentrated_facts,
    fit_regressions,
    join_trace,
    layer_correlations,
    mixed_effects,
    pearson,
    resample_facts,
    trace_table,
)
from locedit.analysis.bootstrap import bootstrap_draws, bootstrap_r2
from locedit.analysis.regression import FORMULAS, random_intercept_ml, regression_frame

LAYERS = np.array([2, 5, 9, 13, 17])


def make_slice(
    n_facts: int = 40,
    trace_coef: float = 0.0,
    noise: float = 0.05,
    seed: int = 0,
    fact_sd: float = 0.0,
) -> pd.DataFrame:
    """One (method, problem) slice: score = layer mean + trace_coef x trace (+ fact effect) + noise."""
    rng = np.random.default_rng(seed)
    layer_mean = dict(zip(LAYERS, [0.9, 0.95, 0.7, 0.5, 0.3], strict=True))
    fact_effect = fact_sd * rng.standard_normal(n_facts)
    rows = []
    for f in range(n_facts):
        for layer in LAYERS:
            trace = rng.uniform(0, 1)
            score = (
                layer_mean[layer]
                + trace_coef * trace
                + fact_effect[f]
                + noise * rng.standard_normal()
            )
            rows.append(
                {"fact_id": f"f{f}", "layer": int(layer), "trace": trace, "rewrite_score": score}
            )
    return pd.DataFrame(rows)


def numpy_designs(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The three design matrices written out by hand: treatment-coded layer dummies, trace, interactions."""
    levels = np.sort(df["layer"].unique())
    dummies = (df["layer"].to_numpy()[:, None] == levels[None, 1:]).astype(float)
    ones = np.ones((len(df), 1))
    t = df["trace"].to_numpy()[:, None]
    return {
        "layer": np.hstack([ones, dummies]),
        "trace": np.hstack([ones, t]),
        "both": np.hstack([ones, dummies, t, dummies * t]),
    }


def numpy_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, int]:
    beta, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    return float(resid @ resid), resid, int(rank)


def check_against_numpy(df: pd.DataFrame, res) -> None:
    y = df["rewrite_score"].to_numpy()
    tss = float(((y - y.mean()) ** 2).sum())
    fits = {name: numpy_fit(x, y) for name, x in numpy_designs(df).items()}
    for name, (ssr, resid, _) in fits.items():
        assert getattr(res, f"r2_{name}") == pytest.approx(1 - ssr / tss, abs=1e-10)
        assert getattr(res, f"rmse_{name}") == pytest.approx(np.sqrt(np.mean(resid**2)), abs=1e-10)
        assert getattr(res, f"mae_{name}") == pytest.approx(np.mean(np.abs(resid)), abs=1e-10)
    assert res.added_r2 == pytest.approx((fits["layer"][0] - fits["both"][0]) / tss, abs=1e-10)
    (ssr_r, _, rank_r), (ssr_f, _, rank_f) = fits["layer"], fits["both"]
    df_num, df_den = rank_f - rank_r, len(y) - rank_f
    f_stat = ((ssr_r - ssr_f) / df_num) / (ssr_f / df_den)
    assert res.f_df_num == df_num and res.f_df_denom == df_den
    assert res.f_stat == pytest.approx(f_stat, rel=1e-8)
    assert res.f_pvalue == pytest.approx(stats.f.sf(f_stat, df_num, df_den), rel=1e-6, abs=1e-300)


def test_score_depending_only_on_layer_gets_no_added_r2():
    df = make_slice(trace_coef=0.0, seed=1)
    res = fit_regressions(df, "rewrite_score")
    check_against_numpy(df, res)
    assert res.r2_layer > 0.9
    assert res.added_r2 < 0.02
    assert res.r2_trace < 0.05
    assert res.f_pvalue > 0.05
    assert (res.n, res.n_facts, res.n_layers) == (200, 40, 5)


def test_score_depending_on_trace_gets_large_added_r2_and_tiny_p():
    df = make_slice(trace_coef=0.6, seed=2)
    res = fit_regressions(df, "rewrite_score")
    check_against_numpy(df, res)
    assert res.added_r2 > 0.3
    assert res.f_pvalue < 1e-20
    assert res.pearson_r > 0.3


def test_fits_equal_statsmodels_formulas():
    df = make_slice(trace_coef=0.2, seed=3)
    res = fit_regressions(df, "rewrite_score")
    data = df.rename(columns={"rewrite_score": "score"})
    for name, formula in FORMULAS.items():
        assert getattr(res, f"r2_{name}") == pytest.approx(
            smf.ols(formula, data).fit().rsquared, abs=1e-10
        )


def test_pearson_and_per_layer_correlations_match_scipy():
    df = make_slice(trace_coef=0.3, seed=4)
    r, p, why = pearson(df["trace"], df["rewrite_score"])
    ref = stats.pearsonr(df["trace"], df["rewrite_score"])
    assert (r, p, why) == (
        pytest.approx(ref.statistic, abs=1e-12),
        pytest.approx(ref.pvalue, rel=1e-8),
        "",
    )
    corr = layer_correlations(df, "rewrite_score")
    assert list(corr["layer"]) == list(LAYERS)
    for _, row in corr.iterrows():
        part = df[df["layer"] == row["layer"]]
        ref = stats.pearsonr(part["trace"], part["rewrite_score"])
        assert row["pearson_r"] == pytest.approx(ref.statistic, abs=1e-12)
        assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)
        assert row["n"] == 40


@pytest.mark.parametrize(
    ("case", "expect_reason"),
    [
        ("one_layer", "one layer only"),
        ("constant_score", "score is constant"),
        ("constant_trace", "trace adds no column"),
        ("two_rows", ""),
        ("one_row", "only 1 usable rows"),
        ("empty", "only 0 usable rows"),
        ("missing_scores", "rows with missing"),
        ("all_layers_saturated", "no residual degrees of freedom"),
    ],
)
def test_degenerate_inputs_give_nan_with_reason_not_errors(case, expect_reason):
    df = make_slice(n_facts=6, trace_coef=0.3, seed=5)
    if case == "one_layer":
        df = df[df["layer"] == 9]
    elif case == "constant_score":
        df = df.assign(rewrite_score=0.7)
    elif case == "constant_trace":
        df = df.assign(trace=0.25)
    elif case == "two_rows":
        df = df.iloc[:2]
    elif case == "one_row":
        df = df.iloc[:1]
    elif case == "empty":
        df = df.iloc[:0]
    elif case == "missing_scores":
        df = df.copy()
        df.loc[df.index[:4], "rewrite_score"] = np.nan
    elif case == "all_layers_saturated":
        df = df[df["fact_id"].isin(["f0", "f1"])]  # 2 points per layer: layer x trace fits exactly
    res = fit_regressions(df, "rewrite_score")
    assert expect_reason in res.reason
    if case == "one_layer":
        assert res.r2_layer == pytest.approx(0.0, abs=1e-12)
        assert res.added_r2 == pytest.approx(res.r2_trace, abs=1e-12)
        assert math.isfinite(res.f_pvalue)
    if case == "constant_score":
        assert math.isnan(res.r2_layer) and math.isnan(res.added_r2) and math.isnan(res.f_pvalue)
        assert res.rmse_both == pytest.approx(0.0, abs=1e-12)
    if case == "constant_trace":
        assert math.isnan(res.f_pvalue)
        assert res.added_r2 == pytest.approx(0.0, abs=1e-10)
        assert res.r2_trace == pytest.approx(0.0, abs=1e-10)
    if case in {"one_row", "empty"}:
        assert math.isnan(res.r2_layer)
    if case == "missing_scores":
        assert res.n == len(df) - 4 and res.n_missing_score == 4
    if case == "all_layers_saturated":
        assert math.isnan(res.f_pvalue)
    mixed = mixed_effects(df, "rewrite_score")  # never raises either
    assert isinstance(mixed.mixed_reason, str)
    draws = bootstrap_r2(df, "rewrite_score", 10, seed=0)
    assert "bootstrap_valid" in draws


def test_missing_metric_column_is_reported():
    df = make_slice(n_facts=5)
    res = fit_regressions(df, "essence_score")
    assert "absent" in res.reason and res.n == 0


def test_concentrated_rule_on_hand_made_curves():
    layers = np.arange(10)
    curves = {
        # peak 1.0 at layer 5, nothing else near it: concentrated
        "sharp": [0.1, 0.1, 0.1, 0.1, 0.2, 1.0, 0.3, 0.1, 0.1, 0.1],
        # three other layers at >= 50% of the peak (one exactly at 50%): still concentrated
        "three": [0.0, 0.0, 0.5, 0.6, 0.8, 1.0, 0.49, 0.0, 0.0, 0.0],
        # four other layers at >= 50%: not concentrated
        "four": [0.0, 0.55, 0.6, 0.7, 0.9, 1.0, 0.2, 0.0, 0.0, 0.0],
        # peak 0.2: the threshold is relative to the fact's own maximum
        "small": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.09, 0.2, 0.05],
        # nothing positive: no localization to concentrate
        "flat": [0.0] * 10,
        "negative": [-0.1] * 9 + [-0.05],
    }
    trace = pd.DataFrame(
        [
            {"fact_id": f, "layer": int(lay), "trace": float(v)}
            for f, c in curves.items()
            for lay, v in zip(layers, c, strict=True)
        ]
    )
    out = concentrated_facts(trace, max_other_layers=3, fraction=0.5).set_index("fact_id")
    assert out.loc["sharp", "concentrated"] and out.loc["sharp", "n_other_layers_near_max"] == 0
    assert out.loc["three", "concentrated"] and out.loc["three", "n_other_layers_near_max"] == 3
    assert not out.loc["four", "concentrated"] and out.loc["four", "n_other_layers_near_max"] == 4
    assert out.loc["small", "concentrated"] and out.loc["small", "argmax_layer"] == 8
    assert out.loc["small", "n_other_layers_near_max"] == 0
    assert not out.loc["flat", "concentrated"] and out.loc["flat", "reason"]
    assert not out.loc["negative", "concentrated"]
    assert out.loc["sharp", "max_effect"] == 1.0 and out.loc["sharp", "argmax_layer"] == 5
    stricter = concentrated_facts(trace, max_other_layers=2).set_index("fact_id")
    assert not stricter.loc["three", "concentrated"]


def test_bootstrap_resamples_facts_keeping_their_rows_together():
    # unequal fact sizes, rows of a fact interleaved with other facts' rows
    fact_ids = np.array(["a", "b", "a", "c", "b", "a", "d", "c"])
    rng = np.random.default_rng(0)
    sizes = {f: int((fact_ids == f).sum()) for f in np.unique(fact_ids)}
    for _ in range(50):
        idx = resample_facts(fact_ids, rng)
        drawn = fact_ids[idx]
        # rows arrive in blocks, one block per drawn fact, each block = all rows of that fact
        pos, n_blocks = 0, 0
        while pos < len(drawn):
            fact = drawn[pos]
            block = idx[pos : pos + sizes[fact]]
            assert sorted(block) == list(np.flatnonzero(fact_ids == fact))
            pos += sizes[fact]
            n_blocks += 1
        assert n_blocks == len(sizes)  # as many draws as there are facts


def test_bootstrap_draws_equal_refits_on_stacked_resamples():
    df = make_slice(n_facts=12, trace_coef=0.2, seed=6)
    df = df.drop(index=[3, 17, 18])  # facts of unequal size
    draws = bootstrap_draws(df, "rewrite_score", n_samples=15, seed=11)
    data = regression_frame(df, "rewrite_score")
    rng = np.random.default_rng(11)
    for b in range(15):
        stacked = data.iloc[resample_facts(data["fact_id"], rng)].rename(
            columns={"score": "rewrite_score"}
        )
        res = fit_regressions(stacked.reset_index(drop=True), "rewrite_score")
        expect = [res.r2_layer, res.r2_trace, res.r2_both, res.added_r2]
        np.testing.assert_allclose(draws[b], expect, atol=1e-9)


def test_bootstrap_intervals_cover_the_estimate_and_widen_with_fact_effects():
    df = make_slice(n_facts=30, trace_coef=0.3, seed=7)
    point = fit_regressions(df, "rewrite_score")
    ci = bootstrap_r2(df, "rewrite_score", 200, seed=0)
    assert ci["bootstrap_valid"] == 200
    for stat in ("r2_layer", "r2_both", "added_r2"):
        assert ci[f"{stat}_lo"] <= getattr(point, stat) <= ci[f"{stat}_hi"]
    assert bootstrap_r2(df, "rewrite_score", 200, seed=0) == ci  # seeded


def test_mixed_model_matches_statsmodels_and_survives_the_boundary():
    from statsmodels.regression.mixed_linear_model import MixedLM

    df = make_slice(n_facts=25, trace_coef=0.2, seed=8, fact_sd=0.2)
    data = df.rename(columns={"rewrite_score": "score"})
    x = numpy_designs(df)["layer"]
    ref = MixedLM(data["score"].to_numpy(), x, groups=data["fact_id"].to_numpy()).fit(reml=False)
    direct = random_intercept_ml(data["score"].to_numpy(), x, data["fact_id"].to_numpy())
    assert direct.llf == pytest.approx(ref.llf, abs=1e-4)
    np.testing.assert_allclose(direct.fe_params, ref.fe_params, atol=1e-4)
    assert direct.var_fact == pytest.approx(float(np.asarray(ref.cov_re)[0, 0]), rel=1e-3)

    res = mixed_effects(df, "rewrite_score")
    assert res.mixed_lr_pvalue < 1e-6 and res.mixed_added_r2m > 0.02
    assert res.mixed_fact_share > 0.3  # facts differ: most non-layer variance is per fact

    # no fact effect at all: the fact variance sits on the boundary 0, MixedLM.fit may fail;
    # the result is still finite, and the LR test matches the OLS likelihood ratio
    flat = make_slice(n_facts=20, trace_coef=0.0, seed=9, fact_sd=0.0)
    res = mixed_effects(flat, "rewrite_score")
    assert math.isfinite(res.mixed_lr_pvalue) and res.mixed_lr_pvalue > 0.01
    ols = {
        n: smf.ols(f, flat.rename(columns={"rewrite_score": "score"})).fit()
        for n, f in FORMULAS.items()
    }
    assert res.mixed_lr_stat == pytest.approx(2 * (ols["both"].llf - ols["layer"].llf), abs=0.05)


def effects_table(facts, layers, value=0.4, low=()) -> pd.DataFrame:
    rows = []
    for f in facts:
        for method in ("tracing", "zeroing"):
            for layer in layers:
                rows.append(
                    {
                        "fact_id": f,
                        "method": method,
                        "kind": "mlp",
                        "window": 5,
                        "layer": layer,
                        "effect_max": value + 0.01 * layer,
                        "effect_last_subject": value / 2,
                        "argmax_token": 1,
                        "p_clean": 0.5,
                        "p_noised": 0.1,
                        "low_denominator": f in low,
                    }
                )
    return pd.DataFrame(rows)


def test_join_counts_failed_low_denominator_and_missing_trace_rows():
    effects = effects_table(["a", "b", "c"], [1, 2], low=("c",))
    results = pd.DataFrame(
        [
            {
                "fact_id": f,
                "layer": lay,
                "method": "rome",
                "problem": "error_injection",
                "status": "ok",
                "reason": "",
                "rewrite_score": 0.5,
            }
            for f in ("a", "b", "c", "d")
            for lay in (1, 2)
        ]
    )
    results.loc[0, ["status", "reason", "rewrite_score"]] = ["failed", "nonfinite weights", np.nan]
    trace = trace_table(effects, TraceSpec())
    joined, report = join_trace(results, trace, drop_low_denominator=True)
    assert report.n_results == 8 and report.n_failed == 1
    assert report.failed_reasons == {"nonfinite weights": 1}
    assert report.n_missing_trace == 2  # fact d was never traced
    assert report.n_low_denominator == 2 and report.n_used == 3 == len(joined)
    assert joined["trace"].tolist() == pytest.approx([0.42, 0.41, 0.42])  # b1... order as results
    kept, report = join_trace(results, trace, drop_low_denominator=False)
    assert report.n_used == 5 and "kept" in " ".join(report.lines())
    zeroing = trace_table(effects, TraceSpec(method="zeroing", statistic="effect_last_subject"))
    assert set(zeroing["trace"]) == {0.2}
    assert trace_table(effects, TraceSpec(window=10)).empty


def test_config_rejects_unknown_keys_and_metrics():
    with pytest.raises(ValueError, match="unknown analysis keys"):
        AnalysisConfig.from_params({"bootstrap": 3})
    with pytest.raises(ValueError, match="not among"):
        AnalysisConfig.from_params({"metrics": ["accuracy"]})
    cfg = AnalysisConfig.from_params(
        {"trace": {"window": "10", "statistic": "effect_last_subject"}}, seed=3
    )
    assert cfg.trace.window == 10 and cfg.seed == 3


@pytest.mark.parametrize("n_facts, saturated", [(2, True), (3, False)])
def test_a_saturated_fit_gets_no_bootstrap_interval(n_facts, saturated):
    """2 facts at 4 layers: layer x trace has 8 parameters for 8 rows, so every resample of both
    facts fits exactly up to the solver's rank cut-off; its interval (seen: added R² 54% with
    an "interval" of 0% to 3%) would be rounding, so none is given. 3 facts keep theirs."""
    from locedit.analysis import analyze
    from locedit.analysis.synthetic import synthetic_effects, synthetic_results

    effects = synthetic_effects(n_facts=n_facts, seed=4)
    results = synthetic_results(effects, edit_layers=(1, 5, 9, 13), methods=("rome",), seed=4)
    cfg = AnalysisConfig(bootstrap_samples=50, variants=(), mixed_effects=False)
    (row,) = analyze(effects, results, cfg).regressions.query(
        "metric == 'rewrite_score'"
    ).to_dict("records")
    assert row["n"] == 4 * n_facts and (row["f_df_denom"] == 0) == saturated
    bounds = [row.get(f"{s}_{b}", math.nan) for s in ("r2_layer", "added_r2") for b in ("lo", "hi")]
    if saturated:
        assert all(math.isnan(v) for v in bounds)
    else:
        assert row["added_r2_lo"] <= row["added_r2"] <= row["added_r2_hi"]
