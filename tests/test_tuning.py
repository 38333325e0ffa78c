"""Optuna tuning (paper App. A): the paper's grids, the rewrite ceiling as a constraint, the
fallback when nothing is feasible, resuming from storage, MLflow runs, and the edit stage
reading the chosen values."""

from __future__ import annotations

import json
import logging
import math

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from locedit.data.records import FactRecord, write_records
from locedit.pipeline import edit as edit_stage
from locedit.pipeline import tune as tune_stage
from locedit.pipeline.common import compose_params
from locedit.sweep import ResultStore, results_table, run_sweep
from locedit.testing import save_tiny
from locedit.tuning import CONSTRAINT, PAPER_HPARAM_GRIDS, is_feasible, select_trial
from locedit.tuning import trials as trials_module

FACTS = [
    FactRecord(
        "f1",
        "Eiffel Tower",
        "The Eiffel Tower is located in",
        "Paris",
        "Rome",
        ("Where is the Eiffel Tower? It is in",),
        ("The Louvre is located in",),
        extra={"erasure_ok": True},
    ),
    FactRecord(
        "f2",
        "Danielle Darrieux",
        "Danielle Darrieux speaks",
        "French",
        "English",
        ("The language of Danielle Darrieux is",),
        ("Michel Rocard speaks",),
        extra={"erasure_ok": True},
    ),
    FactRecord(
        "f3",
        "Toko Yasuda",
        "Toko Yasuda plays the",
        "guitar",
        "piano",
        (),
        ("Jimi Hendrix plays the",),
        extra={"erasure_ok": False},
    ),
]
EPS_GRID = {1e-4, 5e-5, 2e-5, 1e-5}
KL_GRID = {0.0625, 0.9, 1.0}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tiny model and one MLflow store for the module (creating either costs seconds)."""
    root = tmp_path_factory.mktemp("tuning")
    return {
        "model": save_tiny(root / "tiny", "gpt2", n_layers=3),
        "tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db",
    }


def make_params(
    tmp_path,
    shared,
    methods=("ft1",),
    problems=("error_injection",),
    extra=(),
    outputs=None,
    tuned_params=None,
):
    outputs = outputs or tmp_path / "outputs"
    params = compose_params(
        "conf",
        [
            f"model.name={shared['model']}",
            f"paths.outputs={outputs}", f"paths.reports={outputs}/reports",
            f"mlflow.tracking_uri={shared['tracking_uri']}",
            "mlflow.experiment=locedit-test",
            f"edit.methods=[{','.join(methods)}]",
            f"edit.problems=[{','.join(problems)}]",
            f"edit.tuned_params={tuned_params or outputs / 'tune' / 'best_hparams.json'}",
            "edit.layers=[1]",
            "edit.threads=1",
            "edit.essence.enabled=false",
            "trace.noise_sigma=0.5",
            "trace.noise_samples=3",
            "stats.n_samples=8",
            "stats.sample_length=12",
            "method.rome.v_steps=3",
            "method.rome.n_context_templates=2",
            "method.ft.steps=3",
            "tune.enabled=true",
            "tune.layer=1",
            "tune.n_facts=3",
            *extra,
        ],
    )
    write_records(outputs / "filter" / "facts.jsonl", FACTS)
    return params


def finished(result) -> list[dict]:
    return [t for t in result.trials if t["state"] == "COMPLETE"]


def test_grid_visits_the_paper_values_and_picks_the_best_feasible(tmp_path, shared):
    params = make_params(tmp_path, shared, extra=["tune.max_rewrite=0.99", "tune.plots=false"])
    result = tune_stage.run_single(params, method="FT1", problem="error_injection", mode="grid")

    trials = finished(result)
    assert [t["state"] for t in result.trials] == ["COMPLETE"] * 4
    assert {t["params"]["linf_eps"] for t in trials} == EPS_GRID == set(PAPER_HPARAM_GRIDS["linf_eps"])
    assert result.complete and result.ran_now == 4 and result.layer == 1 and result.n_facts == 3

    # a trial's means equal the edit stage's sweep with its value, averaged independently here
    # (the largest and smallest radius, to keep the test short)
    eps = lambda t: t["params"]["linf_eps"]  # noqa: E731
    for t in (min(trials, key=eps), max(trials, key=eps)):
        pinned = tmp_path / f"pinned-{t['number']}.json"
        pinned.write_text(json.dumps({"hparams": {"error_injection": {"ft1": t["params"]}}}))
        sweep_params = make_params(
            tmp_path, shared, outputs=tmp_path / f"sweep-{t['number']}", tuned_params=pinned
        )
        spec = edit_stage.build_spec(sweep_params)
        assert spec.hparams[("ft1", "error_injection")].linf_eps == t["params"]["linf_eps"]
        run_sweep(spec, progress=False)
        table = results_table(ResultStore(spec.out_dir).rows())
        assert (table.status == "ok").all() and len(table) == 3
        for name in ("rewrite_score", "paraphrase_score", "neighborhood_score", "overall_score"):
            assert t[f"mean_{name}"] == pytest.approx(table[name].mean(), rel=1e-6, abs=1e-12)
        assert t["constraints"][CONSTRAINT] == pytest.approx(table["rewrite_score"].mean() - 0.99)

    # everything is feasible under 0.99: the choice is the largest mean overall score
    best = max(trials, key=lambda t: t["value"])
    assert result.selection.feasible and result.selection.rule == "best_feasible"
    assert result.selection.params == best["params"]

    # a ceiling between the two highest rewrites makes the top-rewrite value infeasible
    by_rewrite = sorted(trials, key=lambda t: t["mean_rewrite_score"])
    assert by_rewrite[-1]["mean_rewrite_score"] > by_rewrite[-2]["mean_rewrite_score"]
    ceiling = (by_rewrite[-1]["mean_rewrite_score"] + by_rewrite[-2]["mean_rewrite_score"]) / 2
    params = make_params(
        tmp_path, shared, extra=[f"tune.max_rewrite={ceiling!r}", "tune.plots=false"]
    )
    constrained = tune_stage.run_single(params, method="ft1", problem="error_injection")
    # the ceiling is part of the study's identity
    assert constrained.study_name != result.study_name
    expected = max(
        (t for t in trials if t["mean_rewrite_score"] <= ceiling), key=lambda t: t["value"]
    )
    assert constrained.selection.feasible and constrained.selection.params == expected["params"]
    infeasible = [t for t in finished(constrained) if not t["feasible"]]
    assert [t["params"] for t in infeasible] == [by_rewrite[-1]["params"]]

    written = json.loads((tmp_path / "outputs" / "tune" / "best_hparams.json").read_text())
    assert written["hparams"] == {"error_injection": {"ft1": expected["params"]}}
    assert written["studies"]["ft1/error_injection"]["study_name"] == constrained.study_name


def test_no_feasible_value_is_reported_and_falls_back(tmp_path, shared, caplog):
    """The stage run: studies nested in MLflow, the fallback rule, pins, and the edit stage."""
    import mlflow

    params = make_params(
        tmp_path,
        shared,
        methods=("rome", "ft1"),
        extra=["tune.max_rewrite=-1.0", "+tune.pin.error_injection.ft1.linf_eps=3.0e-5"],
    )
    with caplog.at_level(logging.WARNING, logger="locedit.tuning.study"):
        tune_stage.run(params)
    assert "no trial satisfies mean rewrite <= -1" in caplog.text

    out = tmp_path / "outputs" / "tune"
    written = json.loads((out / "best_hparams.json").read_text())
    study = written["studies"]["rome/error_injection"]
    assert list(written["studies"]) == ["rome/error_injection"]  # ft1 is pinned, not tuned
    trials = [t for t in study["trials"] if t["state"] == "COMPLETE"]
    assert {t["params"]["kl_factor"] for t in trials} == KL_GRID
    assert not any(t["feasible"] for t in trials)
    # the documented rule: lowest mean rewrite, ties to the higher objective, then the first trial
    lowest = min(trials, key=lambda t: (t["mean_rewrite_score"], -t["value"], t["number"]))
    assert (
        study["selection"]["rule"] == "least_violation" and study["selection"]["feasible"] is False
    )
    assert written["hparams"]["error_injection"]["rome"] == lowest["params"]
    assert written["hparams"]["error_injection"]["ft1"] == {"linf_eps": 3.0e-5}
    assert written["infeasible"] == ["rome/error_injection"]
    for name in (
        "optimization_history.png",
        "param_importances.png",
        "tuning_curve.png",
        "trials.csv",
    ):
        assert (out / "studies" / "rome-error_injection" / name).stat().st_size > 0

    # the `conf` fallback keeps the configured value instead
    loaded = optuna.load_study(study_name=study["study_name"], storage=params.tune.storage)
    conf_choice = select_trial(loaded, -1.0, "conf")
    assert conf_choice.params is None and conf_choice.rule == "conf" and not conf_choice.feasible

    # the edit stage applies the tuned and pinned values over conf/problem
    spec = edit_stage.build_spec(params)
    assert spec.hparams[("rome", "error_injection")].kl_factor == lowest["params"]["kl_factor"]
    assert spec.hparams[("ft1", "error_injection")].linf_eps == 3.0e-5

    # MLflow: stage run > study run > one nested run per trial with the scores and the constraint
    client = mlflow.tracking.MlflowClient(shared["tracking_uri"])
    stage_id = json.loads((out.parent / "runs" / "tune.json").read_text())["run_id"]
    study_run = client.get_run(study["mlflow_run_id"])
    assert study_run.data.tags["mlflow.parentRunId"] == stage_id
    assert study_run.data.tags["selection.rule"] == "least_violation"
    experiment = study_run.info.experiment_id
    trial_runs = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{study_run.info.run_id}'"
    )
    assert len(trial_runs) == 3
    for run in trial_runs:
        metrics = run.data.metrics
        assert metrics["constraint_satisfied"] == 0.0
        assert {
            "mean_rewrite_score",
            "mean_paraphrase_score",
            "mean_neighborhood_score",
            "mean_overall_score",
        } <= set(metrics)
        assert float(run.data.params["kl_factor"]) in KL_GRID
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/param_importances.png"} <= artifacts

    # tuning off: the file says so at once and the edit stage keeps conf/problem's paper values
    off = make_params(tmp_path, shared, methods=("rome", "ft1"), extra=["tune.enabled=false"])
    tune_stage.run(off)
    written = json.loads((out / "best_hparams.json").read_text())
    assert written["hparams"] == {} and written["enabled"] is False
    spec = edit_stage.build_spec(off)
    assert spec.hparams[("rome", "error_injection")].kl_factor == 1.0
    assert spec.hparams[("ft1", "error_injection")].linf_eps == 1e-4


def test_an_interrupted_study_resumes_from_its_storage(tmp_path, shared, monkeypatch):
    params = make_params(tmp_path, shared, extra=["tune.plots=false"])
    original = trials_module.evaluate
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trials_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune_stage.run_single(params, method="ft1", problem="error_injection")
    names = optuna.get_all_study_names(params.tune.storage)
    assert len(names) == 1
    before = optuna.load_study(study_name=names[0], storage=params.tune.storage)
    assert [t.state for t in before.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    first = before.trials[0]
    first_run = before.user_attrs["mlflow_run_id"]  # read now: the study object reads storage

    calls["n"] = 10
    result = tune_stage.run_single(params, method="ft1", problem="error_injection")
    assert result.study_name == names[0] and result.ran_now == 3 and result.complete
    after = optuna.load_study(study_name=names[0], storage=params.tune.storage)
    assert after.trials[0].datetime_complete == first.datetime_complete
    assert after.trials[0].value == first.value and after.trials[0].params == first.params
    done = [t for t in after.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and {t.params["linf_eps"] for t in done} == EPS_GRID
    # this run's trials have their own MLflow run, which names the interrupted one
    import mlflow

    resumed = mlflow.get_run(after.user_attrs["mlflow_run_id"])
    assert resumed.info.run_id != first_run
    assert resumed.data.tags["locedit.resumed_from"] == first_run

    # nothing left to do: a third run evaluates nothing and chooses the same value
    again = tune_stage.run_single(params, method="ft1", problem="error_injection")
    assert again.ran_now == 0 and again.selection.params == result.selection.params


def test_search_mode_uses_tpe_ranges_steps_and_reports_each_fact(tmp_path, shared):
    params = make_params(
        tmp_path,
        shared,
        problems=("fact_forcing",),
        extra=[
            "tune.mode=search",
            "tune.n_trials=3",
            "tune.search.n_startup_trials=2",
            "tune.search.pruner_warmup_facts=0",
            "tune.search.steps.fact_forcing.ft1=[2,3]",
            "tune.plots=false",
        ],
    )
    result = tune_stage.run_single(params, method="ft1", problem="fact_forcing")
    study = optuna.load_study(study_name=result.study_name, storage=params.tune.storage)
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    finished_trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished_trials) == 3 and result.ran_now == 3
    for t in finished_trials:
        assert 1e-6 <= t.params["linf_eps"] <= 1e-3 and t.params["steps"] in (2, 3)
        assert CONSTRAINT in t.constraints
        assert sorted(t.intermediate_values) == list(range(len(t.intermediate_values)))
        if t.state == TrialState.COMPLETE:
            assert len(t.intermediate_values) == 3
            assert t.intermediate_values[2] == pytest.approx(t.value)
    assert result.selection.params is not None and set(result.selection.params) == {
        "linf_eps",
        "steps",
    }
    again = tune_stage.run_single(params, method="ft1", problem="fact_forcing")
    assert again.ran_now == 0 and again.study_name == result.study_name


def test_a_trial_edits_its_facts_in_groups_with_the_same_rows(tmp_path, shared, caplog):
    """edit.group_size 3: a trial's three facts finetuned as one batch (Fact Forcing: their
    subjects' noise stacked) give the rows of one at a time, and the pruner still hears of
    each fact in order; edit.group_size reaches the study's target."""
    import dataclasses

    from locedit.tuning import evaluate

    params = make_params(tmp_path, shared, problems=("fact_forcing",),
                         extra=["edit.group_size=3"])
    target, _ = tune_stage.build_target(params, "ft1", "fact_forcing", tune_stage.tune_config(params))
    assert target.group_size == 3
    runs = []
    for size in (1, 3):
        heard = []
        scores = evaluate(dataclasses.replace(target, group_size=size), {"steps": 3},
                          lambda i, _scores, heard=heard: heard.append(i))
        assert heard == [0, 1, 2]
        runs.append(sorted(scores.rows, key=lambda r: r["key"]))
    assert "one at a time" not in caplog.text  # the group ran as one batch
    for one, grouped in zip(*runs, strict=True):
        assert one["key"] == grouped["key"] and one["status"] == grouped["status"] == "ok"
        for name in ("rewrite_score", "paraphrase_score", "neighborhood_score", "p_target_post"):
            if not math.isnan(one[name]):
                assert grouped[name] == pytest.approx(one[name], rel=1e-5, abs=1e-9), name


def _trial(number_value, rewrite, max_rewrite=0.5):
    return create_trial(
        params={"kl_factor": number_value[0]},
        distributions={"kl_factor": optuna.distributions.FloatDistribution(0.01, 10, log=True)},
        value=number_value[1],
        user_attrs={"mean_rewrite_score": rewrite, "mean_overall_score": number_value[1]},
        system_attrs={f"constraints:{CONSTRAINT}": rewrite - max_rewrite},
    )


def test_selection_rules_on_known_trials():
    study = optuna.create_study(direction="maximize")
    assert select_trial(study, 0.5).rule == "none"
    for kl, value, rewrite in [
        (0.0625, 0.9, 0.7),
        (0.9, 0.6, 0.4),
        (1.0, 0.7, 0.5),
        (0.3, 0.65, 0.45),
    ]:
        study.add_trial(_trial((kl, value), rewrite))
    choice = select_trial(study, 0.5)
    # 0.0625 scores highest but breaks the ceiling; 1.0 sits exactly on it and is feasible
    assert choice.feasible and choice.params == {"kl_factor": 1.0} and choice.trial == 2
    assert [is_feasible(t) for t in study.trials] == [False, True, True, True]

    none_ok = optuna.create_study(direction="maximize")
    for kl, value, rewrite in [(0.0625, 0.9, 0.99), (0.9, 0.8, 0.95), (1.0, 0.85, 0.97)]:
        none_ok.add_trial(_trial((kl, value), rewrite, max_rewrite=0.5))
    fallback = select_trial(none_ok, 0.5)
    assert not fallback.feasible and fallback.rule == "least_violation"
    assert fallback.params == {"kl_factor": 0.9} and "no trial satisfies" in fallback.message
    assert select_trial(none_ok, 0.5, "conf").params is None
    assert math.isclose(fallback.values["mean_rewrite_score"], 0.95)


@pytest.mark.slow
def test_gemma_grid_trades_rewrite_against_neighbourhood(tmp_path):
    """On the bundled Gemma-3-270M a wider L-infinity ball edits more (higher mean rewrite) and
    the grid study chooses within the paper's values; also measures the cost of a trial."""
    import time

    outputs = tmp_path / "outputs"
    params = compose_params(
        "conf",
        [
            f"paths.outputs={outputs}", f"paths.reports={outputs}/reports",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
            "edit.methods=[ft1]",
            "edit.problems=[error_injection]",
            f"edit.tuned_params={outputs / 'tune' / 'best_hparams.json'}",
            "trace.noise_sigma=3.09",
            "tune.enabled=true",
            "tune.n_facts=3",
            "tune.plots=false",
        ],
    )
    write_records(outputs / "filter" / "facts.jsonl", FACTS)
    start = time.perf_counter()
    tune_stage.run(params)
    seconds = time.perf_counter() - start
    written = json.loads((outputs / "tune" / "best_hparams.json").read_text())
    study = written["studies"]["ft1/error_injection"]
    trials = sorted(
        (t for t in study["trials"] if t["state"] == "COMPLETE"),
        key=lambda t: t["params"]["linf_eps"],
    )
    assert [t["params"]["linf_eps"] for t in trials] == sorted(EPS_GRID)
    rewrites = [t["mean_rewrite_score"] for t in trials]
    assert rewrites == sorted(rewrites) and rewrites[-1] > rewrites[0]
    assert written["hparams"]["error_injection"]["ft1"]["linf_eps"] in EPS_GRID
    print(f"gemma ft1 grid: 4 trials x 3 facts in {seconds:.1f} s; rewrites {rewrites}")
