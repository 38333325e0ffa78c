"""MLflow set-up and logging helpers shared by every stage.

Tracking goes to ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/`` (DESIGN.md §3),
so ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db`` shows every run. The experiment
is marked as model development (MLflow 3 otherwise opens it on its GenAI overview), and every
run carries the code it ran (git commit, code version) and the DVC experiment that started it.
Each pipeline run is one run tree (:mod:`locedit.tracking.pipeline`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from locedit.versioning import package_version

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "locedit"
#: MLflow 3's UI opens an experiment on its runs table for this kind (not the GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Environment variables ``dvc exp run`` sets for the stage commands, and the run tags they become.
DVC_ENV_TAGS = {
    "DVC_EXP_NAME": "dvc.exp_name",
    "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev",
    "DVC_STAGE": "dvc.stage",
}
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def configure(tracking_uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at our store (creating ``mlruns/``) and select the experiment."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        db_path = Path(uri.removeprefix("sqlite:///"))
        db_path.parent.mkdir(parents=True, exist_ok=True)
        artifact_root = (db_path.parent / "artifacts").resolve().as_uri()
    else:
        artifact_root = None
    mlflow.set_tracking_uri(uri)
    name = experiment or DEFAULT_EXPERIMENT
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        mlflow.create_experiment(
            name, artifact_location=artifact_root, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    elif EXPERIMENT_KIND_TAG not in found.tags:  # a store from before the kind was set
        mlflow.MlflowClient().set_experiment_tag(
            found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
        )
    mlflow.set_experiment(name)
    return uri


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), *args],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


@functools.cache
def _git_tags() -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {"mlflow.source.git.commit": commit, "locedit.git_dirty": str(bool(status)).lower()}


def run_tags() -> dict[str, str]:
    """Tags that trace a run back to its code and experiment.

    ``mlflow.source.git.commit`` (shown by the UI) and ``locedit.git_dirty`` when locedit runs
    from a git checkout, ``locedit.code_version`` always, and the DVC experiment's name,
    baseline commit and stage when ``dvc exp run`` / ``dvc repro`` started the command.
    """
    tags = {"locedit.code_version": package_version(), **_git_tags()}
    for env, tag in DVC_ENV_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def dotted(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The leaves of a nested mapping, named ``a.b.c``."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from dotted(value, f"{name}.")
        else:
            yield name, value


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``a.b.c`` keys with string values, as MLflow params want."""
    return {
        name: (json.dumps(value) if isinstance(value, list | tuple) else str(value))[:6000]
        for name, value in dotted(params, prefix)
    }


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any] | None = None,
    mlflow_cfg: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    pipeline: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage, nested under ``parent_run_id`` when given.

    With ``pipeline`` (the whole composed params) and no ``parent_run_id``, the run is a stage
    of its pipeline run (:mod:`locedit.tracking.pipeline`): nested under that invocation's
    parent, which ends with it, and named in ``<paths.outputs>/runs/<stage>.json`` at the end.
    While it runs, ``runs/<stage>.running.json`` names it and its parent: a process killed
    with ``kill -9`` cannot end them, so the stage's next start ends them as KILLED (stages
    call this under their output lock, so the named run's writer is gone).
    """
    import mlflow

    from locedit.tracking import pipeline as tree

    cfg = dict(mlflow_cfg or {})
    configure(cfg.get("tracking_uri"), cfg.get("experiment"))
    tags = {"locedit.stage": stage, **run_tags()}
    client = mlflow.MlflowClient()
    top = pipeline is not None and parent_run_id is None
    if top:
        outputs = Path(str(pipeline["paths"]["outputs"]))
        for killed in tree.take_running(outputs, stage):  # a kill -9 left them RUNNING
            end_abandoned_run(killed, cfg)
        experiment = mlflow.get_experiment_by_name(cfg.get("experiment") or DEFAULT_EXPERIMENT)
        start_ms = tree.take_stage_start()
        parent_run_id = tree.pipeline_parent(client, experiment.experiment_id, pipeline, start_ms)
        tree.stage_started(client, parent_run_id)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    opened = {"run_name": run_name or stage, "tags": tags}
    if top:  # the run starts when the `locedit run` process did, not after loading the model
        created = client.create_run(experiment.experiment_id, start_time=start_ms, **opened)
        opened = {"run_id": created.info.run_id}
    with mlflow.start_run(nested=parent_run_id is not None, **opened) as run:
        if params:
            mlflow.log_params(flatten(params))
        if not top:
            yield run
            return
        tree.mark_running(outputs, stage, run.info.run_id, parent_run_id)
        try:
            yield run
        except BaseException:
            tree.stage_finished(client, parent_run_id, stage, run.info.run_id, outputs, failed=True)
            tree.take_running(outputs, stage)
            raise
        tree.write_run_file(outputs, stage, run.info.run_id, parent_run_id)
        tree.take_running(outputs, stage)
    tree.stage_finished(client, parent_run_id, stage, run.info.run_id, outputs, failed=False)


@contextmanager
def timed_child_run(
    parent_run_id: str,
    stage: str,
    run_name: str,
    params: Mapping[str, Any],
    start_ms: int,
    end_ms: int,
) -> Iterator[Any]:
    """A nested run with the given start and end (ms since the epoch): work timed while it
    happened and logged afterwards shows its real duration, not the logging's."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    tags = {"locedit.stage": stage, "mlflow.parentRunId": parent_run_id, **run_tags()}
    run = client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=run_name)
    with mlflow.start_run(run_id=run.info.run_id, nested=True):
        mlflow.log_params(flatten(params))
        yield run
    client.set_terminated(run.info.run_id, "FINISHED", end_time=max(end_ms, start_ms))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log finite numeric metrics; MLflow keys allow only a limited character set."""
    import math

    import mlflow

    clean = {
        _metric_key(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def _metric_key(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-./ " else "_" for ch in key)


def log_artifacts(paths: list[Path] | Path, artifact_path: str | None = None) -> None:
    import mlflow

    for path in [paths] if isinstance(paths, Path) else paths:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def end_abandoned_run(run_id: str, mlflow_cfg: Mapping[str, Any] | None = None) -> bool:
    """End as KILLED a run that a killed process (``kill -9``, a lost machine) left RUNNING;
    returns whether it did. Call it under the stage's output lock, so its writer is gone."""
    import mlflow
    from mlflow.exceptions import MlflowException

    cfg = dict(mlflow_cfg or {})
    configure(cfg.get("tracking_uri"), cfg.get("experiment"))
    client = mlflow.MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
    except MlflowException:
        return False  # a run of another store, or deleted
    client.set_terminated(run_id, status="KILLED")
    log.warning("MLflow run %s of an interrupted stage was left RUNNING: ended as KILLED", run_id)
    return True
