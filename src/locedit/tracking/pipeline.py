"""One MLflow run tree per pipeline run: a parent run per ``dvc repro`` / ``dvc exp run``, one
nested run per stage that ran, and links to the runs that produced the outputs DVC kept.

DVC starts every stage as its own ``locedit run <stage>`` process, so the stages of one
pipeline run find their parent by an *invocation key*, stored on the parent as the tag
``locedit.pipeline_key``:

* ``LOCEDIT_PIPELINE_ID`` when set (a script grouping its own ``locedit run`` calls);
* under DVC (``DVC_STAGE`` set), the DVC process that started the stage: its host, pid and
  start time. Every stage of one ``dvc repro`` / ``dvc exp run`` shares it (DVC runs them in
  turn from one process, through ``$SHELL -c``), and the next invocation differs;
* otherwise this process, so ``locedit run X`` alone is a pipeline run of one stage.

The first stage of an invocation finds no parent with its key and creates one; each stage
ends the parent again with its own end time (so the parent spans the stages that ran) and
status. Each stage writes ``<paths.outputs>/runs/<stage>.json`` (a DVC out of that stage),
naming its run; when DVC skips a stage, its restored file names the run that produced its
outputs, and the parent is tagged ``locedit.reused.<stage>`` with that run id instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The DVC stages in pipeline order (dvc.yaml).
STAGE_ORDER = ("prepare", "filter", "stats", "trace", "tune", "edit", "analyze")
PIPELINE_STAGE = "pipeline"
KEY_TAG = "locedit.pipeline_key"
STAGE_TAG = "locedit.stage"
PIPELINE_ENV = "LOCEDIT_PIPELINE_ID"
#: An MLflow 3 shared view of the runs table (experiment tag ``mlflow.sharedViewState.<key>``,
#: opened by ``#/experiments/<id>/runs?viewStateShareKey=headline``): the headline columns.
HEADLINE_VIEW = "headline"
#: Processes between DVC and a stage command (DVC runs ``$SHELL -c "<cmd>"``).
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "fish", "ksh"})
#: Params logged on the parent (the stages log their own sections; the whole params.yaml is an
#: artifact of the parent), so the runs table stays narrow.
PIPELINE_PARAMS = (
    "experiment_name",
    "model.name",
    "data.dataset",
    "data.max_facts",
    "edit.methods",
    "edit.problems",
    "tune.enabled",
    "seed",
)


_STAGE_START_MS: int | None = None


def mark_stage_start() -> None:
    """Called by ``locedit run``: the stage's run starts when its process started."""
    import psutil

    global _STAGE_START_MS
    _STAGE_START_MS = int(psutil.Process().create_time() * 1000)


def take_stage_start() -> int:
    """The marked start (once), else now, in ms since the epoch."""
    global _STAGE_START_MS
    start, _STAGE_START_MS = _STAGE_START_MS, None
    return start if start is not None else int(time.time() * 1000)


def _dvc_process_key() -> str | None:
    """``host:pid:start`` of the DVC process that started this stage command."""
    import psutil

    try:
        proc = psutil.Process().parent()
        while proc is not None and proc.name() in SHELLS:
            proc = proc.parent()
        if proc is None:
            return None
        return f"dvc:{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"
    except psutil.Error:
        return None


def invocation_key() -> str:
    """The key all stages of one pipeline run share (module docstring)."""
    if os.environ.get(PIPELINE_ENV):
        return f"env:{os.environ[PIPELINE_ENV]}"
    if os.environ.get("DVC_STAGE"):
        key = _dvc_process_key()
        if key:
            return key
    import psutil

    start = psutil.Process().create_time()
    return f"process:{socket.gethostname()}:{os.getpid()}:{start:.3f}"


def run_file(outputs: Path | str, stage: str) -> Path:
    """``<paths.outputs>/runs/<stage>.json``: the run that produced the stage's outputs."""
    return Path(outputs) / "runs" / f"{stage}.json"


def _read_record(path: Path) -> dict[str, Any]:
    """A run record file's JSON object; empty when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_record(path: Path, record: dict[str, Any]) -> None:
    from locedit.storage import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def read_run_file(outputs: Path | str, stage: str) -> dict[str, Any]:
    return _read_record(run_file(outputs, stage))


def write_run_file(outputs: Path | str, stage: str, run_id: str | None, parent_id: str | None) -> None:
    _write_record(
        run_file(outputs, stage), {"stage": stage, "run_id": run_id, "pipeline_run_id": parent_id}
    )


def _running_file(outputs: Path | str, stage: str) -> Path:
    return Path(outputs) / "runs" / f"{stage}.running.json"


def mark_running(outputs: Path | str, stage: str, run_id: str, parent_id: str | None) -> None:
    """``runs/<stage>.running.json``: the stage's run and its pipeline run while it runs."""
    _write_record(_running_file(outputs, stage), {"run_id": run_id, "pipeline_run_id": parent_id})


def take_running(outputs: Path | str, stage: str) -> list[str]:
    """Remove the stage's running marker; returns the run ids it named (none when absent)."""
    path = _running_file(outputs, stage)
    record = _read_record(path)
    path.unlink(missing_ok=True)
    return [str(record[k]) for k in ("run_id", "pipeline_run_id") if record.get(k)]


def _pick(params: Mapping[str, Any], dotted_key: str) -> Any:
    value: Any = params
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _run_name(key: str) -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    stamp = time.strftime("%Y-%m-%d %H:%M")
    if exp:
        return exp
    if key.startswith("dvc:"):
        return f"dvc repro {stamp}"
    return f"locedit {stamp}"


def pipeline_parent(
    client, experiment_id: str, params: Mapping[str, Any], start_ms: int | None = None
) -> str:
    """The id of this invocation's parent run, created (starting at ``start_ms``, with its tags,
    a few params and params.yaml as an artifact) by the first stage that asks."""
    from omegaconf import DictConfig, OmegaConf

    from locedit.tracking import flatten, run_tags

    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    key = invocation_key()
    found = client.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {STAGE_TAG: PIPELINE_STAGE, KEY_TAG: key, **run_tags()}
    tags.pop("dvc.stage", None)
    run = client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=_run_name(key))
    run_id = run.info.run_id
    picked = {k: _pick(params, k) for k in PIPELINE_PARAMS}
    for name, value in flatten({k: v for k, v in picked.items() if v is not None}).items():
        client.log_param(run_id, name, value)
    client.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(params)), "params.yaml")
    log.info("MLflow pipeline run %s (%s)", run_id, key)
    return run_id


def _stages_ran(client, parent_id: str) -> dict[str, str]:
    """stage -> nested run id, for the stages that ran in this pipeline run."""
    experiment = client.get_run(parent_id).info.experiment_id
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )
    return {r.data.tags.get(STAGE_TAG, ""): r.info.run_id for r in children}


def stage_started(client, parent_id: str) -> None:
    """The parent is running again while a stage runs."""
    client.update_run(parent_id, status="RUNNING")


def stage_finished(
    client, parent_id: str, stage: str, run_id: str, outputs: Path | str, failed: bool
) -> None:
    """End the parent at this stage's end time, record the stage, and link every earlier stage
    DVC skipped in this pipeline run to the run named in its restored run file."""
    client.set_tag(parent_id, f"locedit.run.{stage}", run_id)
    ran = _stages_ran(client, parent_id)
    client.set_tag(parent_id, "locedit.stages_ran", ",".join(s for s in STAGE_ORDER if s in ran))
    if stage in STAGE_ORDER:
        for earlier in STAGE_ORDER[: STAGE_ORDER.index(stage)]:
            if earlier in ran:
                continue
            producer = read_run_file(outputs, earlier).get("run_id")
            if producer:
                client.set_tag(parent_id, f"locedit.reused.{earlier}", producer)
    client.set_terminated(
        parent_id, status="FAILED" if failed else "FINISHED", end_time=int(time.time() * 1000)
    )


def save_headline_view(client, experiment_id: str, metric_keys: list[str]) -> None:
    """The runs table with the headline metrics as its columns (MLflow 3.17 shows no metric
    column by default): a shared view, the JSON MLflow's UI reads from the experiment tag."""
    columns = [f"metrics.`{key}`" for key in metric_keys]
    client.set_experiment_tag(
        experiment_id, f"mlflow.sharedViewState.{HEADLINE_VIEW}", json.dumps({"selectedColumns": columns})
    )
