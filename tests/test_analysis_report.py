"""The analyze stage end to end on synthetic tables: tables, figures, summary, MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from locedit.analysis import AnalysisConfig, analyze, fit_regressions, write_report
from locedit.analysis.metrics_file import flat_metrics
from locedit.analysis.synthetic import synthetic_effects, synthetic_results
from locedit.analysis.tables import all_tables

EDIT_LAYERS = (1, 4, 7)


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    effects = synthetic_effects(
        n_facts=10, n_model_layers=9, windows=(5, 3), seed=1, low_denominator_facts=1
    )
    results = pd.concat(
        [
            synthetic_results(
                effects,
                EDIT_LAYERS,
                methods=("rome", "ft5"),
                problems=("error_injection", "fact_forcing"),
                trace_effect=0.3,
                n_failed=2,
                seed=2,
            ),
            synthetic_results(effects, EDIT_LAYERS, methods=("rome",), dataset="zsre", seed=3),
        ],
        ignore_index=True,
    )
    return effects, results


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the module: creating the sqlite schema costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlruns')}/mlflow.db"


def params_for(root: Path, tracking_uri: str, **analysis) -> OmegaConf:
    return OmegaConf.create(
        {
            "seed": 0,
            "paths": {"outputs": str(root / "outputs"), "reports": str(root / "reports")},
            "model": {"name": "tiny-synthetic"},
            "mlflow": {"tracking_uri": tracking_uri, "experiment": "locedit-test"},
            "analysis": {"bootstrap_samples": 20, **analysis},
        }
    )


def test_stage_writes_reports_and_logs_the_headline_in_its_pipeline_run(
    tmp_path, tables, tracking_uri
):
    import mlflow

    from locedit.pipeline import analyze as stage
    from locedit.tracking.pipeline import read_run_file

    effects, results = tables
    (tmp_path / "outputs" / "trace").mkdir(parents=True)
    (tmp_path / "outputs" / "edit").mkdir(parents=True)
    effects.to_parquet(tmp_path / "outputs" / "trace" / "effects.parquet")
    results.to_parquet(tmp_path / "outputs" / "edit" / "results.parquet")
    params = params_for(
        tmp_path,
        tracking_uri,
        metrics=["rewrite_score", "overall_score"],
        variants=["last_subject", "windows"],
    )

    stage.run(params)

    reports = tmp_path / "reports"
    summary = (reports / "summary.md").read_text()
    assert "tiny-synthetic" in summary and "## Finding" in summary
    assert "edit layer explains" in summary and "failed edits excluded" in summary
    for name in ("table1", "table3", "table6", "table7", "table8"):
        assert (reports / "tables" / f"{name}.csv").exists(), name
        assert (reports / "tables" / f"{name}.md").read_text().startswith("### Table")
    assert not (reports / "tables" / "table4.csv").exists()  # paraphrase not in analysis.metrics
    assert "Table 4 skipped" in summary
    figures = {p.name.split("_")[0] for p in (reports / "figures").glob("*.png")}
    assert {
        "fig01",
        "fig04",
        "fig06",
        "fig07",
        "fig08",
        "fig09",
        "fig12",
        "fig15",
        "fig16",
        "fig17",
        "fig19",
    } <= figures

    # Table 1 carries the same numbers as the regression on the joined slice
    table1 = pd.read_csv(reports / "tables" / "table1.csv")
    regressions = pd.read_csv(reports / "tables" / "regressions.csv")
    row = regressions[
        (regressions["variant"] == "main")
        & (regressions["dataset"] == "counterfact")
        & (regressions["method"] == "rome")
        & (regressions["problem"] == "error_injection")
        & (regressions["metric"] == "rewrite_score")
    ].iloc[0]
    assert table1.loc[0, "Layer"] == pytest.approx(row["r2_layer"])
    assert table1.loc[0, "Diff"] == pytest.approx(row["added_r2"])
    assert row["n"] < 10 * len(EDIT_LAYERS)  # the low-denominator fact and failed edits are out
    assert math.isfinite(row["mixed_lr_pvalue"]) and math.isfinite(row["added_r2_lo"])

    # MLflow: the analyze run, nested in this process's pipeline run, with the reports
    written = read_run_file(tmp_path / "outputs", "analyze")
    run = mlflow.get_run(written["run_id"])
    parent = mlflow.get_run(written["pipeline_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["locedit.stage"] == "analyze" and "locedit.code_version" in run.data.tags
    assert parent.data.tags["locedit.stage"] == "pipeline"
    assert parent.data.tags["locedit.run.analyze"] == run.info.run_id
    assert run.data.params["analysis.bootstrap_samples"] == "20"
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "analysis")}
    assert {
        "analysis/summary.md", "analysis/tables", "analysis/figures",
        "analysis/metrics.json", "analysis/metrics_detail.json",
    } <= logged
    figs = [a.path for a in client.list_artifacts(run.info.run_id, "analysis/figures")]
    assert any(p.endswith(".png") for p in figs)

    # reports/metrics.json (DVC metrics): Table 3's numbers, counts, and the same as MLflow metrics
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["edits"] == len(results) and metrics["failed"] == int(
        (results["status"] != "ok").sum()
    )
    assert metrics["facts"] == results["fact_id"].nunique()
    rome = metrics["error_injection"]["rome"]
    for stat in ("r2_layer", "r2_trace", "r2_both", "added_r2", "added_r2_lo", "added_r2_hi"):
        assert rome[stat] == pytest.approx(row[stat], abs=1e-6), stat
    assert set(metrics) == {"edits", "facts", "failed", "error_injection", "fact_forcing"}
    assert "zsre" not in json.dumps(metrics)
    # the headline is the analyze run's metrics and the pipeline run's, and nothing else there
    headline = {k: v for k, v in flat_metrics(metrics).items()}
    assert run.data.metrics == pytest.approx({**headline, "analysis.seconds": run.data.metrics[
        "analysis.seconds"]})
    assert parent.data.metrics == pytest.approx(headline)
    view = client.get_experiment(run.info.experiment_id).tags["mlflow.sharedViewState.headline"]
    assert json.loads(view)["selectedColumns"] == [f"metrics.`{k}`" for k in headline]
    assert run.data.metrics["error_injection.rome.r2_layer"] == pytest.approx(rome["r2_layer"])
    detail = json.loads((reports / "metrics_detail.json").read_text())
    assert set(detail["seconds"]) == {"analyze"}
    by_layer = detail["rewrite_by_layer"]["fact_forcing"]["ft5"]["4"]

    # reports/plots/*.csv (DVC plots): means by layer, computed here by hand
    curve = pd.read_csv(reports / "plots" / "rewrite_by_layer.csv")
    ok = results[
        (results["status"] == "ok")
        & (results["dataset"] == "counterfact")
        & (results["method"] == "ft5")
        & (results["problem"] == "fact_forcing")
        & (results["layer"] == 4)
    ]
    point = curve[(curve["series"] == "ft5 / fact_forcing") & (curve["layer"] == 4)].iloc[0]
    assert point["rewrite_score"] == pytest.approx(np.mean(ok["rewrite_score"]), rel=1e-5)
    assert by_layer == pytest.approx(np.mean(ok["rewrite_score"]), rel=1e-5)
    assert point["n"] == len(ok)
    trace = pd.read_csv(reports / "plots" / "trace_by_layer.csv")
    sel = effects[
        (effects["method"] == "tracing") & (effects["kind"] == "mlp") & (effects["window"] == 3)
        & (effects["layer"] == 2)
    ]
    point = trace[(trace["series"] == "tracing mlp w3") & (trace["layer"] == 2)].iloc[0]
    assert point["effect"] == pytest.approx(np.mean(sel["effect_max"]), rel=1e-5)

    # the random-location baseline (issue 21.4): table, figure, metrics.json, MLflow, summary
    baseline = pd.read_csv(reports / "tables" / "random_baseline.csv")
    assert set(baseline["Metric"]) == {"Rewrite Score", "Overall Score"}
    assert len(baseline) == 2 * 2 * 2  # methods x problems x metrics, main dataset only
    assert (reports / "figures" / "random_baseline.png").exists()
    assert "## Random-location baseline" in summary
    rb = detail["random_baseline"]["error_injection"]["rome"]["rewrite_score"]
    rome_ei = baseline[
        (baseline["Method"] == "ROME (1 layer)")
        & (baseline["Editing Problem"] == "Error Injection")
        & (baseline["Metric"] == "Rewrite Score")
    ].iloc[0]
    assert rb["diff"] == pytest.approx(rome_ei["Tracing − random"], abs=1e-6)
    assert rb["n_facts"] == rome_ei["Facts"] <= 9  # the low-denominator fact is out


def test_each_pipeline_invocation_gets_its_own_parent_run(
    tmp_path, tables, tracking_uri, monkeypatch
):
    """Two pipeline runs (keyed by LOCEDIT_PIPELINE_ID here, by the DVC process under DVC) give
    two parent runs, each with its own analyze run and the headline on the parent."""
    import mlflow

    from locedit.pipeline.analyze import log_to_mlflow
    from locedit.tracking.pipeline import PIPELINE_ENV

    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "summary.md").write_text("# summary\n")
    params = params_for(tmp_path, tracking_uri)
    runs = {}
    for key, r2 in (("first", 0.25), ("second", 0.5)):
        monkeypatch.setenv(PIPELINE_ENV, f"{tmp_path.name}-{key}")
        headline = {"edits": 4, "error_injection": {"rome": {"r2_layer": r2, "f_pvalue": None}}}
        runs[key] = mlflow.get_run(log_to_mlflow(params, reports, 1.0, headline))
    parents = {k: mlflow.get_run(r.data.tags["mlflow.parentRunId"]) for k, r in runs.items()}
    assert parents["first"].info.run_id != parents["second"].info.run_id
    for key, r2 in (("first", 0.25), ("second", 0.5)):
        assert parents[key].data.metrics == {"edits": 4.0, "error_injection.rome.r2_layer": r2}
        assert parents[key].data.tags["locedit.pipeline_key"] == f"env:{tmp_path.name}-{key}"
        assert parents[key].info.status == "FINISHED"
        assert parents[key].info.end_time >= runs[key].info.end_time


def test_tables_follow_the_paper_layout_and_skip_with_notes(tables):
    effects, results = tables
    cfg = AnalysisConfig(bootstrap_samples=10, variants=("concentrated",), mixed_effects=False)
    an = analyze(effects, results[results["dataset"] == "counterfact"], cfg)
    made, notes = all_tables(an)
    names = [t.name for t in made]
    assert names == [
        "table1",
        "table2",
        "table3",
        "table4",
        "table5",
        "table6",
        "table7",
        "random_baseline",
    ]
    assert any(n.startswith("Table 8 skipped") for n in notes)
    table3 = next(t for t in made if t.name == "table3")
    assert list(table3.frame.columns[:7]) == [
        "Editing Problem",
        "Method",
        "Layer",
        "Trace",
        "Both",
        "Diff",
        "p-value",
    ]
    assert list(table3.frame["Editing Problem"]) == ["Error Injection"] * 2 + ["Fact Forcing"] * 2
    assert list(table3.frame["Method"]) == ["FT (5 layers)", "ROME (1 layer)"] * 2
    md = table3.to_markdown()
    assert "| Diff 95% CI |" in md and "<1e-4" in md
    table7 = next(t for t in made if t.name == "table7").frame
    assert set(table7["Regression Metric"]) == {"R²", "RMSE", "MAE"}
    assert set(table7["Predictor(s)"]) == {"Layer", "Tracing Effect", "Both"}

    joined = an.joined["main"]
    part = joined[(joined["method"] == "rome") & (joined["problem"] == "error_injection")]
    direct = fit_regressions(part, "overall_score")
    rmse = table7[
        (table7["Method"] == "ROME (1 layer)")
        & (table7["Edit Metric"] == "Overall Score")
        & (table7["Regression Metric"] == "RMSE")
        & (table7["Predictor(s)"] == "Layer")
    ]["Value"]
    assert float(rmse.iloc[0]) == pytest.approx(direct.rmse_layer)


def test_tiny_and_degenerate_inputs_produce_a_report_not_a_crash(tmp_path):
    effects = synthetic_effects(n_facts=2, n_model_layers=3, windows=(5,), zeroing=False, seed=4)
    results = synthetic_results(effects, edit_layers=(1,), methods=("rome",), seed=5)
    results["rewrite_score"] = 0.75  # constant outcome
    results["essence_score"] = np.nan  # not computed
    an = analyze(effects, results, AnalysisConfig(bootstrap_samples=20, variants=("zeroing",)))
    files = write_report(an, tmp_path, "tiny")
    row = an.regression("main", "counterfact", "rome", "error_injection", "rewrite_score")
    assert math.isnan(row["r2_layer"]) and "constant" in row["reason"]
    assert any("Variant 'zeroing'" in n for n in an.notes)
    summary = (tmp_path / "summary.md").read_text()
    assert "## Skipped" in summary and "Fig. 8 skipped" in summary
    assert all(p.exists() for p in files)
    table1 = (tmp_path / "tables" / "table1.md").read_text()
    assert "n/a" in table1 and "score is constant" in table1
