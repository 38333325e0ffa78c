"""One Optuna study per (method, problem): maximise the mean overall score of the tuning facts
subject to mean rewrite score <= ``max_rewrite`` (paper App. A), resumable from RDB storage.

The constraint is Optuna's own (``Trial.set_constraint``; Optuna 5 replaced samplers'
``constraints_func`` with it): TPE models infeasible trials separately and ``Study.best_trial``
considers feasible trials only. When no trial is feasible, :func:`select_trial` applies the
documented fallback: ``least_violation`` takes the completed trial with the lowest mean
rewrite (the one closest to the ceiling, i.e. the most conservative edit), ``conf`` keeps
the configured value.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from tqdm.auto import tqdm

from locedit.sweep.plan import content_id
from locedit.tuning import plots
from locedit.tuning.objective import TrialScores, TuneTarget, evaluate
from locedit.tuning.space import SearchSpace, TuneConfig
from locedit.tuning.tracking import log_trial_metrics, study_run, trial_run

log = logging.getLogger(__name__)

#: Name of the rewrite-ceiling constraint (feasible when <= 0).
CONSTRAINT = "mean_rewrite_minus_max"


class NoScores(RuntimeError):
    """Every edit of a trial failed or was skipped: the trial has no score (state FAIL)."""


@dataclass
class Selection:
    """The hyperparameters a study chose and why."""

    params: dict[str, Any] | None
    feasible: bool
    rule: str  # best_feasible | least_violation | conf | none
    trial: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "feasible": self.feasible,
            "rule": self.rule,
            "trial": self.trial,
            "values": {
                k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in self.values.items()
            },
            "message": self.message,
        }


@dataclass
class StudyResult:
    """A finished (or resumed-and-finished) study: its identity, trials and choice."""

    study_name: str
    storage: str
    space: SearchSpace
    layer: int
    n_facts: int
    selection: Selection
    trials: list[dict[str, Any]]
    ran_now: int
    complete: bool
    plots: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "method": self.space.method,
            "problem": self.space.problem,
            "layer": self.layer,
            "n_facts": self.n_facts,
            "space": self.space.to_dict(),
            "selection": self.selection.to_dict(),
            "trials": self.trials,
            "ran_now": self.ran_now,
            "complete": self.complete,
            "plots": self.plots,
            "mlflow_run_id": self.mlflow_run_id,
        }


# -- naming and storage -----------------------------------------------------------------------
def study_name(
    model: str,
    method: str,
    problem: str,
    data_slice: str,
    layer: int,
    mode: str,
    identity: Any,
) -> str:
    """``model/method/problem/data slice/layer/mode/digest``: readable, and distinct whenever
    anything that changes a trial's scores changes (the digest covers the rest)."""
    tag = Path(str(model)).name or str(model)
    return f"{tag}/{method}/{problem}/{data_slice}/L{layer}/{mode}/{content_id(identity)}"


def safe_url(url: str) -> str:
    """The storage URL with any password hidden (for logs, JSON and MLflow)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any unparsable URL is shown as given
        return url


def open_storage(url: str, config: TuneConfig) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats: a trial whose process died is marked failed after the grace
    period and retried once, so a killed study resumes cleanly and workers can share it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        kwargs: dict[str, Any] = {}
        if config.heartbeat_interval:
            kwargs = {
                "heartbeat_interval": int(config.heartbeat_interval),
                "grace_period": int(config.grace_period or 2 * int(config.heartbeat_interval)),
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                ),
            }
        return optuna.storages.RDBStorage(url, **kwargs)


def make_sampler(space: SearchSpace, config: TuneConfig) -> optuna.samplers.BaseSampler:
    if space.mode == "grid":
        return optuna.samplers.GridSampler(space.grid_search_space(), seed=config.seed)
    return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.n_startup_trials)


def make_pruner(space: SearchSpace, config: TuneConfig) -> optuna.pruners.BasePruner:
    """Grid mode never prunes (every paper value is fully evaluated); search mode prunes on the
    running mean objective reported after each fact."""
    if space.mode == "grid" or config.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=config.n_startup_trials,
        n_warmup_steps=config.pruner_warmup_facts,
    )


def open_study(
    name: str, storage: optuna.storages.BaseStorage, space: SearchSpace, config: TuneConfig
) -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=make_sampler(space, config),
        pruner=make_pruner(space, config),
    )


# -- selection ----------------------------------------------------------------------------------
def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return bool(trial.constraints) and all(v <= 0.0 for v in trial.constraints.values())


def _trial_values(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    return {k: v for k, v in trial.user_attrs.items() if k.startswith("mean_")}


def select_trial(
    study: optuna.Study, max_rewrite: float, fallback: str = "least_violation"
) -> Selection:
    """The best feasible trial, or the documented fallback when none is feasible."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return Selection(
            None,
            False,
            "none",
            message=f"study {study.study_name}: no completed trial; "
            "the edit stage keeps the configured value",
        )
    if any(is_feasible(t) for t in complete):
        best = study.best_trial  # Optuna: the best among feasible trials
        return Selection(
            dict(best.params),
            True,
            "best_feasible",
            best.number,
            _trial_values(best),
            f"trial {best.number} is the best of {sum(map(is_feasible, complete))} feasible trials",
        )
    lowest = min(
        complete,
        key=lambda t: (t.user_attrs.get("mean_rewrite_score", math.inf), -t.value, t.number),
    )
    rewrite = lowest.user_attrs.get("mean_rewrite_score", math.nan)
    message = (
        f"study {study.study_name}: no trial satisfies mean rewrite <= {max_rewrite:g} "
        f"(lowest mean rewrite {rewrite:.4f}, trial {lowest.number} {lowest.params}); "
    )
    if fallback == "conf":
        return Selection(
            None, False, "conf", None, {}, message + "fallback 'conf': keeping the configured value"
        )
    return Selection(
        dict(lowest.params),
        False,
        "least_violation",
        lowest.number,
        _trial_values(lowest),
        message + "fallback 'least_violation': using that trial",
    )


def trial_summaries(study: optuna.Study) -> list[dict[str, Any]]:
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "value": t.value if t.value is None or math.isfinite(t.value) else None,
                "feasible": is_feasible(t) if t.state == TrialState.COMPLETE else None,
                "constraints": dict(t.constraints),
                **{
                    k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in _trial_values(t).items()
                },
            }
        )
    return out


# -- running ------------------------------------------------------------------------------------
def pending_grid_points(
    study: optuna.Study, space: SearchSpace
) -> tuple[list[dict[str, float]], int]:
    """Grid points no trial has finished, is running or is queued for; and the queued count.

    ``GridSampler`` counts failed trials as visited, so after an interruption the points whose
    trial failed are re-queued here explicitly.
    """
    trials = study.get_trials(deepcopy=False)
    covered = [
        t.params or t.system_attrs.get("fixed_params", {})
        for t in trials
        if t.state
        in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    ]
    missing = [p for p in space.grid_points() if not any(space.contains(p, c) for c in covered)]
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return missing, waiting


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _objective_factory(
    target: TuneTarget,
    space: SearchSpace,
    config: TuneConfig,
    study_run_id: str | None,
    progress: bool,
):
    prune = space.mode == "search" and config.pruner != "none"

    def objective(trial: optuna.Trial) -> float:
        overrides = space.suggest(trial)
        with trial_run(trial, study_run_id, overrides) as run:
            bar = tqdm(
                total=len(target.records),
                desc=f"trial {trial.number}",
                unit="fact",
                leave=False,
                disable=not progress,
            )

            def on_fact(i: int, scores: TrialScores) -> None:
                bar.update(1)
                running = scores.mean(config.objective)
                if math.isnan(running):
                    return
                trial.report(running, step=i)
                if run is not None:
                    log_trial_metrics({f"running_{config.objective}": running}, step=i)
                if prune and trial.should_prune():
                    _record(trial, scores, config)
                    if run is not None:
                        log_trial_metrics({**scores.means(), **scores.counts()})
                    raise optuna.TrialPruned(
                        f"running mean {config.objective} {running:.4f} after {i + 1} facts"
                    )

            try:
                scores = evaluate(target, overrides, on_fact)
            finally:
                bar.close()
            value = _record(trial, scores, config)
            if run is not None:
                log_trial_metrics(
                    {
                        **scores.means(),
                        **scores.counts(),
                        "constraint_satisfied": float(is_feasible_value(scores, config)),
                    }
                )
        return value

    return objective


def is_feasible_value(scores: TrialScores, config: TuneConfig) -> bool:
    return scores.mean("rewrite_score") <= config.max_rewrite


def _record(trial: optuna.Trial, scores: TrialScores, config: TuneConfig) -> float:
    """Store means and counts, set the rewrite constraint, and return the objective."""
    for key, value in {**scores.means(), **scores.counts()}.items():
        trial.set_user_attr(key, value)
    rewrite = scores.mean("rewrite_score")
    value = scores.mean(config.objective)
    if math.isnan(rewrite) or math.isnan(value):
        raise NoScores(f"trial {trial.number}: no successful edit ({scores.counts()})")
    trial.set_constraint(CONSTRAINT, rewrite - config.max_rewrite)
    return value


def run_study(
    target: TuneTarget,
    space: SearchSpace,
    config: TuneConfig,
    name: str,
    out_dir: Path | None = None,
    mlflow_cfg: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run (or resume) the study ``name`` until its grid is covered or it has ``n_trials``
    finished trials, then choose its hyperparameters and save its figures and summary."""
    storage = open_storage(config.storage, config)
    study = open_study(name, storage, space, config)
    if study.trials:
        log.info(
            "study %s: resuming with %d trials in %s",
            name,
            len(study.trials),
            safe_url(config.storage),
        )
    study.set_user_attr("space", space.to_dict())
    study.set_user_attr("max_rewrite", config.max_rewrite)
    logged = {
        "method": space.method,
        "problem": space.problem,
        "mode": space.mode,
        "layer": target.layer,
        "n_facts": len(target.records),
        "study_name": name,
        "storage": safe_url(config.storage),
        "max_rewrite": config.max_rewrite,
        "objective": config.objective,
        "space": space.to_dict(),
        "base_hparams": target.base_hparams.to_dict(),
    }
    use_mlflow = mlflow_cfg is not None
    with study_run(study, logged, mlflow_cfg, parent_run_id) if use_mlflow else _null() as run:
        run_id = run.info.run_id if run is not None else None
        objective = _objective_factory(target, space, config, run_id, progress)
        ran = _optimise(study, objective, space, config, progress)
        selection = select_trial(study, config.max_rewrite, config.fallback)
        (log.info if selection.feasible else log.warning)("%s", selection.message)
        result = StudyResult(
            study_name=name,
            storage=safe_url(config.storage),
            space=space,
            layer=target.layer,
            n_facts=len(target.records),
            selection=selection,
            trials=trial_summaries(study),
            ran_now=ran,
            complete=_is_complete(study, space, config),
            mlflow_run_id=run_id,
        )
        if out_dir is not None:
            _write_outputs(study, result, space, config, out_dir)
        if run is not None:
            _log_study(study, result, out_dir)
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _optimise(
    study: optuna.Study, objective, space: SearchSpace, config: TuneConfig, progress: bool
) -> int:
    """Run the trials still missing; returns how many ran now."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if config.heartbeat_interval:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    catch = (NoScores,)
    if space.mode == "grid":
        missing, waiting = pending_grid_points(study, space)
        total = len(missing) + waiting
        bar = tqdm(
            total=total,
            desc=f"{space.method}/{space.problem} grid",
            unit="trial",
            disable=not progress,
        )
        callbacks = [lambda s, t: bar.update(1)]
        try:
            if not study.trials:  # a fresh study: GridSampler walks the paper's grid
                study.optimize(objective, n_trials=total, catch=catch, callbacks=callbacks)
            else:  # resumed: re-queue the points without a finished trial, one trial each
                for point in missing:
                    study.enqueue_trial(point)
                for _ in range(total):
                    study.optimize(objective, n_trials=1, catch=catch, callbacks=callbacks)
        finally:
            bar.close()
        return total
    remaining = max(0, config.n_trials - _finished(study))
    bar = tqdm(
        total=remaining,
        desc=f"{space.method}/{space.problem} search",
        unit="trial",
        disable=not progress,
    )
    limit = optuna.study.MaxTrialsCallback(
        config.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)
    )
    try:
        if remaining:
            study.optimize(
                objective,
                n_trials=remaining,
                catch=catch,
                callbacks=[limit, lambda s, t: bar.update(1)],
            )
    finally:
        bar.close()
    return remaining


def _is_complete(study: optuna.Study, space: SearchSpace, config: TuneConfig) -> bool:
    if space.mode == "grid":
        finished = [
            t.params
            for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
            )
        ]
        return all(any(space.contains(p, c) for c in finished) for p in space.grid_points())
    return _finished(study) >= config.n_trials


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _write_outputs(
    study: optuna.Study, result: StudyResult, space: SearchSpace, config: TuneConfig, out_dir: Path
) -> None:
    """The study's summary JSON, trials CSV and figures under ``out_dir/<slug>/``."""
    folder = Path(out_dir) / _slug(f"{space.method}-{space.problem}")
    folder.mkdir(parents=True, exist_ok=True)
    study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
    if config.plots:
        import matplotlib

        matplotlib.use("Agg")
        chosen = (result.selection.params or {}).get(space.field)
        made = [
            plots.history_plot(study, folder / "optimization_history.png"),
            plots.importance_plot(study, folder / "param_importances.png"),
            plots.tuning_curve(
                study, folder / "tuning_curve.png", space.field, config.max_rewrite, chosen
            ),
        ]
        result.plots = [str(p) for p in made if p is not None]
    (folder / "study.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")


def _log_study(study: optuna.Study, result: StudyResult, out_dir: Path | None) -> None:
    import mlflow

    from locedit.tracking import log_metrics

    states = [t.state.name for t in study.trials]
    metrics = {
        f"trials_{s.lower()}": float(states.count(s)) for s in ("COMPLETE", "PRUNED", "FAIL")
    }
    metrics["feasible"] = float(result.selection.feasible)
    metrics.update({f"chosen_{k}": v for k, v in result.selection.values.items()})
    for key, value in (result.selection.params or {}).items():
        metrics[f"chosen_{key}"] = float(value)
    log_metrics(metrics)
    mlflow.set_tags(
        {
            "selection.rule": result.selection.rule,
            "selection.feasible": str(result.selection.feasible),
        }
    )
    if out_dir is not None:
        folder = Path(out_dir) / _slug(f"{result.space.method}-{result.space.problem}")
        if folder.exists():
            mlflow.log_artifacts(str(folder), artifact_path="study")
