"""How a study's trials run: the objective (one trial = every tuning fact edited with the
trial's hyperparameters, paper App. A), grid points still to run after an interruption, and
the loop until the grid is covered or ``n_trials`` have finished."""

from __future__ import annotations

import math
import warnings

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from locedit.tuning.objective import TrialScores, TuneTarget, evaluate
from locedit.tuning.selection import CONSTRAINT, is_feasible_value
from locedit.tuning.space import SearchSpace, TuneConfig
from locedit.tuning.tracking import log_trial_metrics, trial_run


class NoScores(RuntimeError):
    """Every edit of a trial failed or was skipped: the trial has no score (state FAIL)."""


def make_objective(
    target: TuneTarget,
    space: SearchSpace,
    config: TuneConfig,
    study_run_id: str | None,
    progress: bool,
):
    """The Optuna objective of one study: a trial's mean score over the tuning facts."""
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
            try:
                scores = evaluate(target, overrides, _fact_reporter(trial, config, run, bar, prune))
            finally:
                bar.close()
            value = record_scores(trial, scores, config)
            if run is not None:
                feasible = float(is_feasible_value(scores, config))
                log_trial_metrics(
                    {**scores.means(), **scores.counts(), "constraint_satisfied": feasible}
                )
        return value

    return objective


def _fact_reporter(trial: optuna.Trial, config: TuneConfig, run, bar, prune: bool):
    """Called after each fact: report the running mean, and prune a hopeless trial (search)."""

    def on_fact(i: int, scores: TrialScores) -> None:
        bar.update(1)
        running = scores.mean(config.objective)
        if math.isnan(running):
            return
        trial.report(running, step=i)
        if run is not None:
            log_trial_metrics({f"running_{config.objective}": running}, step=i)
        if prune and trial.should_prune():
            record_scores(trial, scores, config)
            if run is not None:
                log_trial_metrics({**scores.means(), **scores.counts()})
            raise optuna.TrialPruned(
                f"running mean {config.objective} {running:.4f} after {i + 1} facts"
            )

    return on_fact


def record_scores(trial: optuna.Trial, scores: TrialScores, config: TuneConfig) -> float:
    """Store means and counts, set the rewrite constraint, and return the objective."""
    for key, value in {**scores.means(), **scores.counts()}.items():
        trial.set_user_attr(key, value)
    rewrite = scores.mean("rewrite_score")
    value = scores.mean(config.objective)
    if math.isnan(rewrite) or math.isnan(value):
        raise NoScores(f"trial {trial.number}: no successful edit ({scores.counts()})")
    trial.set_constraint(CONSTRAINT, rewrite - config.max_rewrite)
    return value


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


def optimise(
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


def is_complete(study: optuna.Study, space: SearchSpace, config: TuneConfig) -> bool:
    if space.mode == "grid":
        finished = [
            t.params
            for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
            )
        ]
        return all(any(space.contains(p, c) for c in finished) for p in space.grid_points())
    return _finished(study) >= config.n_trials
