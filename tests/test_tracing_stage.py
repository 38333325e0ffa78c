"""The tracing runner and stage: cache-based resume, skip reasons, the table and the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from locedit.data.records import FactRecord, write_records
from locedit.testing import gpt2_tokenizer, save_tiny, tiny_model
from locedit.tracing import ResultCache, TraceSettings, trace_records
from locedit.tracing import runner as runner_module

FACTS = [
    FactRecord("f0", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French"),
    FactRecord("f1", "Toko Yasuda", "Toko Yasuda plays the", "guitar"),
    FactRecord("f2", "Paris", "The capital of France is Paris", "is"),
    FactRecord(
        "f3",
        "Autonomous University of Madrid",
        "Autonomous University of Madrid, which is located in",
        "Spain",
    ),
]
SETTINGS = TraceSettings(kinds=("mlp",), windows=(3,), noise_samples=2, zeroing=True)


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=3, seed=2)


class Killed(Exception):
    pass


def _run(model, tok, facts, cache, settings=SETTINGS, on_fact=None):
    return trace_records(
        model,
        tok,
        facts,
        settings,
        sigma=0.5,
        seed=0,
        fingerprint="tiny",
        cache=cache,
        on_fact=on_fact,
        progress=False,
    )


def test_resume_after_kill_computes_only_remaining_facts(model, tok, tmp_path, monkeypatch):
    cache = ResultCache(tmp_path / "cache")
    traced: list[str] = []
    original = runner_module.trace_fact_many

    def counting(model_, tok_, fact, **kwargs):
        traced.append(fact.fact_id)
        return original(model_, tok_, fact, **kwargs)

    monkeypatch.setattr(runner_module, "trace_fact_many", counting)

    def kill_after_two(fact, computed):
        if fact.fact_id == "f1":
            raise Killed

    with pytest.raises(Killed):
        _run(model, tok, FACTS, cache, on_fact=kill_after_two)
    assert traced == ["f0", "f1"]

    traced.clear()
    resumed = _run(model, tok, FACTS, cache)
    assert traced == ["f2", "f3"]
    assert (resumed.n_computed, resumed.n_cached) == (2, 2)

    fresh = _run(model, tok, FACTS, None)
    pd.testing.assert_frame_equal(resumed.table(), fresh.table())

    traced.clear()
    again = _run(model, tok, FACTS, cache)
    assert traced == [] and again.n_computed == 0


def test_param_change_recomputes_only_what_it_touches(model, tok, tmp_path):
    cache = ResultCache(tmp_path / "cache")
    _run(model, tok, FACTS[:2], cache)
    n_files = len(list(cache.root.rglob("*.npz")))
    wider = TraceSettings(kinds=("mlp",), windows=(3, 1), noise_samples=2, zeroing=True)
    run = _run(model, tok, FACTS[:2], cache, settings=wider)
    # window 3 came from the cache, window 1 is new: one tracing + one zeroing file per fact
    assert len(list(cache.root.rglob("*.npz"))) == n_files + 4
    assert run.n_computed == 2
    # the flag threshold is not part of the key: changing it recomputes nothing
    flagged = TraceSettings(
        kinds=("mlp",), windows=(3,), noise_samples=2, zeroing=True, min_denominator=0.0
    )
    again = _run(model, tok, FACTS[:2], cache, settings=flagged)
    assert again.n_computed == 0
    assert not again.table().low_denominator.any()


def test_untraceable_facts_are_skipped_with_a_reason(model, tok):
    bad = [
        FactRecord("empty", "", "An empty subject here", "x"),
        FactRecord("missing", "Nowhere Land", "The capital of France is", "Paris"),
        FactRecord("no-target", "France", "The capital of France is", "  "),
    ]
    run = _run(model, tok, [bad[0], FACTS[1], bad[1], bad[2]], None)
    assert [s["fact_id"] for s in run.skipped] == ["empty", "missing", "no-target"]
    assert "empty subject" in run.skipped[0]["reason"]
    assert "subject not in prompt" in run.skipped[1]["reason"]
    assert "target" in run.skipped[2]["reason"]
    assert {r.fact_id for r in run.tracing} == {"f1"}


def test_table_is_tidy(model, tok):
    table = _run(model, tok, FACTS[:2], None).table()
    assert list(table.columns) == runner_module.TABLE_COLUMNS
    assert len(table) == 2 * 2 * 3  # facts x methods x layers
    assert not table.duplicated(["fact_id", "method", "kind", "window", "layer"]).any()
    tracing = table[table.method == "tracing"]
    zeroing = table[table.method == "zeroing"]
    assert tracing.p_noised.notna().all() and zeroing.p_noised.isna().all()
    assert (zeroing.argmax_token == -1).all()
    assert ((tracing.argmax_token >= 0) & (tracing.argmax_token < 10)).all()


def test_grids_and_figures(model, tok, tmp_path):
    from locedit.pipeline import trace as stage

    settings = TraceSettings(kinds=("mlp",), windows=(3, 1), noise_samples=2, min_denominator=-1.0)
    run = _run(model, tok, FACTS[:3], None, settings=settings)
    table = run.table()
    stage.write_grids(run, tmp_path / "grids")
    with np.load(tmp_path / "grids" / "f0.npz") as grid:
        assert str(grid["fact_id"]) == "f0"
        np.testing.assert_array_equal(grid["tracing_mlp_w1_effect"], run.tracing[1].effect)
        np.testing.assert_array_equal(grid["zeroing_mlp_w3_p_zeroed"], run.zeroing[0].p_zeroed)
    paths = stage.write_figures(run, table, settings, 3, tmp_path / "figures", n_heatmaps=2)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "heatmap_f0_mlp_w3.png",
            "heatmap_f1_mlp_w3.png",
            "tracing_curve_mlp_w3.png",
            "tracing_curve_mlp_w1.png",
            "window_comparison_mlp.png",
            "zeroing_curve_mlp.png",
        ]
    )
    assert all(p.stat().st_size > 5000 for p in paths)
    summary = stage.summarize(run, table, 0.5, 3)
    assert summary["n_traced"] == 3 and summary["n_low_denominator"] == 0
    curve = (
        table[(table.method == "tracing") & (table.window == 3)].groupby("layer").effect_max.mean()
    )
    assert summary["tracing.mlp.w3.peak_layer"] == int(curve.idxmax())


def _stage_params(tmp_path, monkeypatch, overrides: list[str]):
    """Params of a stage run on a saved tiny GPT-2 with outputs and MLflow under tmp_path."""
    from locedit.pipeline.common import compose_params

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    model_dir = save_tiny(tmp_path / "tiny", "gpt2", n_layers=3)
    return compose_params(
        "conf",
        [
            f"model.name={model_dir}",
            f"paths.outputs={tmp_path / 'outputs'}", f"paths.reports={tmp_path / 'reports'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
            *overrides,
        ],
    )


def test_stage_writes_outputs_and_logs_to_mlflow(tmp_path, monkeypatch):
    from locedit.pipeline import trace as stage

    params = _stage_params(
        tmp_path,
        monkeypatch,
        ["trace.windows=[3,1]", "trace.noise_samples=2", "trace.n_heatmaps=2"],
    )
    write_records(
        tmp_path / "outputs" / "filter" / "facts.jsonl",
        [*FACTS[:3], FactRecord("bad", "Zed", "No subject", "x")],
    )
    out = tmp_path / "outputs" / "trace"
    out.mkdir(parents=True)
    (out / "effects.parquet.123.tmp").write_text("")  # left by a killed run
    stage.run(params)
    assert not list(out.glob("*.tmp"))
    noise = json.loads((out / "noise.json").read_text())
    assert noise["calibrated"] and noise["n_facts"] == 3 and noise["sigma"] > 0
    table = pd.read_parquet(out / "effects.parquet")
    assert len(table) == 3 * 2 * 2 * 3  # facts x methods x windows x layers
    assert json.loads((out / "skipped.json").read_text())[0]["fact_id"] == "bad"
    grid = np.load(out / "grids" / "f0.npz")
    assert grid["tracing_mlp_w3_p_restored"].shape == (len(grid["tokens"]), 3)
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert "tracing_curve_mlp_w3.png" in figures and "window_comparison_mlp.png" in figures
    assert (
        "zeroing_curve_mlp.png" in figures and sum(f.startswith("heatmap_") for f in figures) == 2
    )

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(
        experiment_names=[str(params.mlflow.experiment)], output_format="list"
    )
    (run,) = [r for r in runs if r.data.tags["locedit.stage"] == "trace"]
    (parent,) = [r for r in runs if r.data.tags["locedit.stage"] == "pipeline"]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["trace.windows"] == "[3, 1]"
    assert run.data.metrics["n_traced"] == 3
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "figures")]
    assert "figures/tracing_curve_mlp_w3.png" in artifacts


def test_stage_with_both_corruptions_writes_str_rows_and_replacements(tmp_path, monkeypatch):
    """trace.corruption=[gaussian,str] end to end: tracing_str rows beside the Gaussian ones,
    the draw in str_replacements.json, STR figures, and noise.json still the Gaussian sigma."""
    from locedit.pipeline import trace as stage

    params = _stage_params(
        tmp_path,
        monkeypatch,
        [
            "trace.windows=[3]",
            "trace.noise_samples=2",
            "trace.n_heatmaps=1",
            "trace.corruption=[gaussian,str]",
        ],
    )
    facts = [
        FactRecord(f"c{i}", city, f"The city of {city} is in the country of", "France")
        for i, city in enumerate(("Paris", "Rome", "London"))
    ] + [FACTS[0]]  # Danielle Darrieux: no same-length subject in this pool
    write_records(tmp_path / "outputs" / "filter" / "facts.jsonl", facts)
    # The pool is the prepared data set (trace.str_pool: prepare), a superset of the facts.
    extra = [FactRecord("x0", "Tokyo", "The city of Tokyo is in the country of", "Japan")]
    write_records(tmp_path / "outputs" / "prepare" / "facts.jsonl", facts + extra)
    stage.run(params)
    out = tmp_path / "outputs" / "trace"
    table = pd.read_parquet(out / "effects.parquet")
    assert set(table.method) == {"tracing", "tracing_str", "zeroing"}
    assert table[table.method == "tracing_str"].fact_id.nunique() == 3
    assert json.loads((out / "noise.json").read_text())["sigma"] > 0
    replacements = json.loads((out / "str_replacements.json").read_text())
    assert replacements["pool"]["n_subjects"] == 5 and replacements["seed"] == int(params.seed)
    prepared = Path(params.paths.outputs) / "prepare" / "facts.jsonl"
    assert replacements["pool"]["source"] == str(prepared)
    assert sorted(replacements["facts"]) == ["c0", "c1", "c2"]
    for fact_id, draw in replacements["facts"].items():
        own = next(f.subject for f in facts if f.fact_id == fact_id)
        assert len(draw["subjects"]) == 2 and own not in draw["subjects"]
    assert [s["fact_id"] for s in replacements["skipped"]] == ["f0"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_str_traced"] == 3 and summary["n_str_skipped"] == 1
    assert summary["n_skipped"] == 0 and summary["corruption"] == ["gaussian", "str"]
    grid = np.load(out / "grids" / "c0.npz")
    assert "tracing_str_mlp_w3_p_restored" in grid and "tracing_mlp_w3_p_restored" in grid
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert {"tracing_str_curve_mlp_w3.png", "corruption_mlp_w3.png"} <= figures
    assert "heatmap_str_c0_mlp_w3.png" in figures
