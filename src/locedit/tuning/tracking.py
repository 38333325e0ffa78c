"""MLflow runs of a study: one run per study, one nested run per trial.

Each pipeline run gets its own study run; a resumed study's run names the earlier one (its id is
kept in the study's user attributes) in the tag ``locedit.resumed_from``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import optuna

from locedit.tracking import configure, flatten, log_metrics, run_tags

log = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"


def _existing_run(run_id: str | None) -> str | None:
    """``run_id`` if that run exists in the current tracking store."""
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return None
    return run_id


@contextmanager
def study_run(
    study: optuna.Study,
    params: Mapping[str, Any],
    mlflow_cfg: Mapping[str, Any] | None,
    parent_run_id: str | None = None,
) -> Iterator[Any]:
    """The study's MLflow run in this pipeline run; a resumed study's earlier run (from an
    earlier pipeline run) is named in the tag ``locedit.resumed_from``, not written into."""
    import mlflow

    cfg = dict(mlflow_cfg or {})
    configure(cfg.get("tracking_uri"), cfg.get("experiment"))
    previous = _existing_run(study.user_attrs.get(RUN_ID_ATTR))
    nested = mlflow.active_run() is not None
    tags = {"locedit.stage": "tune", "optuna.study_name": study.study_name, **run_tags()}
    if previous:
        log.info("study %s: resumed (its earlier MLflow run: %s)", study.study_name, previous)
        tags["locedit.resumed_from"] = previous
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(
        run_name=f"study {params.get('method')}/{params.get('problem')}",
        tags=tags,
        nested=nested or parent_run_id is not None,
    )
    mlflow.log_params(flatten(params))
    study.set_user_attr(RUN_ID_ATTR, run.info.run_id)
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="KILLED")
        raise
    mlflow.end_run()


@contextmanager
def trial_run(
    trial: optuna.Trial, study_run_id: str | None, params: Mapping[str, Any]
) -> Iterator[Any]:
    """A nested run for one trial; its end state says whether it completed, was pruned or failed."""
    if study_run_id is None:
        yield None
        return
    import mlflow

    run = mlflow.start_run(
        run_name=f"trial {trial.number}",
        nested=True,
        tags={
            "locedit.stage": "tune",
            "mlflow.parentRunId": study_run_id,
            "optuna.trial": str(trial.number),
            **run_tags(),
        },
    )
    mlflow.log_params(flatten({"trial": trial.number, **params}))
    trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
    try:
        yield run
    except optuna.TrialPruned:
        mlflow.set_tag("optuna.state", "PRUNED")
        mlflow.end_run(status="FINISHED")
        raise
    except BaseException:
        mlflow.set_tag("optuna.state", "FAIL")
        mlflow.end_run(status="FAILED")
        raise
    mlflow.set_tag("optuna.state", "COMPLETE")
    mlflow.end_run()


def log_trial_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Metrics of the active trial run (no-op without one)."""
    import mlflow

    if mlflow.active_run() is not None:
        log_metrics(metrics, step=step)
