"""Stage `analyze`: regressions, tables, figures and summary from the tracing and edit tables.

Reads outputs/trace/effects.parquet and outputs/edit/results.parquet, writes reports/ (with
reports/metrics.json and reports/plots/*.csv, the files dvc.yaml declares as metrics and plots),
and logs the reports (every R² and the values of metrics.json as metrics) into the sweep's MLflow
run named in outputs/edit/mlflow_run.json, or into a fresh run when that file is absent.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from locedit.analysis import (
    Analysis,
    AnalysisConfig,
    analyze,
    mlflow_metrics,
    read_effects,
    read_results,
    write_report,
)
from locedit.analysis.metrics_file import flat_metrics, write_dvc_files
from locedit.pipeline.common import mark_reports_stale, reports_current, to_container
from locedit.storage import remove_outputs

log = logging.getLogger(__name__)


def _stage_seconds(outputs: Path) -> dict[str, float]:
    """Wall time of the last trace and edit invocations, from their summary.json (when
    present), named ``<stage>_last_run``: a resumed stage's earlier invocations are not in it."""
    seconds: dict[str, float] = {}
    for stage in ("trace", "edit"):
        path = outputs / stage / "summary.json"
        try:
            value = json.loads(path.read_text()).get("seconds")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, int | float):
            seconds[f"{stage}_last_run"] = float(value)
    return seconds


def _inputs(params: DictConfig) -> tuple[Path, Path, Path]:
    outputs = Path(params.paths.outputs)
    return (
        outputs / "trace" / "effects.parquet",
        outputs / "edit" / "results.parquet",
        outputs / "edit" / "mlflow_run.json",
    )


def run(params: DictConfig) -> None:
    effects_path, results_path, run_file = _inputs(params)
    reports = Path(params.paths.get("reports", "reports"))
    # An interrupted analysis must not leave the previous run's reports looking current.
    mark_reports_stale(params, "analyze")
    remove_outputs([reports / "summary.md", reports / "tables.md"])
    for path, stage in ((effects_path, "trace"), (results_path, "edit")):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found; run `dvc repro {stage}` (or `locedit run {stage}`) first"
            )
    cfg = AnalysisConfig.from_params(
        to_container(params.get("analysis", {})), seed=int(params.get("seed", 0))
    )
    model_name = str(params.model.name) if "model" in params else "model"

    start = time.perf_counter()
    an = analyze(read_effects(effects_path), read_results(results_path), cfg)
    write_report(an, reports, model_name)
    seconds = time.perf_counter() - start
    timings = {**_stage_seconds(Path(params.paths.outputs)), "analyze": seconds}
    dvc_metrics = write_dvc_files(an, reports, timings)
    reports_current(params)
    log.info(
        "analysis of %d regressions written to %s in %.1f s", len(an.regressions), reports, seconds
    )

    if cfg.log_mlflow:
        log_to_mlflow(params, an, reports, run_file, seconds, dvc_metrics)
    else:
        log.info("analysis.log_mlflow is false: not logging to MLflow")


def _parent_run_id(run_file: Path) -> str | None:
    if not run_file.exists():
        return None
    try:
        return json.loads(run_file.read_text()).get("run_id") or None
    except (json.JSONDecodeError, AttributeError) as err:
        log.warning("%s unreadable (%s); logging the analysis to a fresh MLflow run", run_file, err)
        return None


def log_to_mlflow(
    params: DictConfig,
    an: Analysis,
    reports: Path,
    run_file: Path,
    seconds: float,
    dvc_metrics: dict | None = None,
) -> str:
    """Log reports/ and the R² metrics into the sweep's run (or a fresh one); returns the run id.

    ``dvc_metrics`` (reports/metrics.json) is logged flat, ``<problem>.<method>.<stat>``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from locedit import tracking

    mlflow_cfg = to_container(params.get("mlflow", {}))
    tracking.configure(mlflow_cfg.get("tracking_uri"), mlflow_cfg.get("experiment"))
    run_id = _parent_run_id(run_file)
    try:
        active = mlflow.start_run(run_id=run_id) if run_id else None
    except MlflowException as err:
        log.warning(
            "MLflow run %s from %s not found in this store (%s); using a fresh run",
            run_id,
            run_file,
            err,
        )
        active = None
    if active is None:
        active = mlflow.start_run(
            run_name="analyze", tags={"locedit.stage": "analyze", **tracking.run_tags()}
        )
        log.info("logging the analysis to a new MLflow run %s", active.info.run_id)
    else:  # the sweep's run has its own tags; say what code and experiment analysed it
        mlflow.set_tags({f"analyze.{k}": v for k, v in tracking.run_tags().items()})
    with active:
        analysis_params = tracking.flatten(
            to_container(params.get("analysis", {})), prefix="analysis."
        )
        try:
            mlflow.log_params(analysis_params)
        except MlflowException as err:  # the sweep's run may hold other values of these params
            log.warning("analysis params not logged to run %s: %s", active.info.run_id, err)
        metrics = mlflow_metrics(an)
        metrics["analysis.seconds"] = seconds
        metrics.update(flat_metrics(dvc_metrics or {}))
        items = list(metrics.items())
        for i in range(0, len(items), 500):
            tracking.log_metrics(dict(items[i : i + 500]))
        tracking.log_artifacts(
            [reports / "summary.md", reports / "tables.md"], artifact_path="analysis"
        )
        for sub in ("tables", "figures"):
            if (reports / sub).is_dir():
                tracking.log_artifacts(reports / sub, artifact_path=f"analysis/{sub}")
        mlflow.set_tag("locedit.analysis", "done")
        return active.info.run_id
