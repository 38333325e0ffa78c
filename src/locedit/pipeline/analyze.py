"""Stage `analyze`: regressions, tables, figures and summary from the tracing and edit tables.

Reads outputs/trace/effects.parquet and outputs/edit/results.parquet, writes reports/ (with
reports/metrics.json, the headline dvc.yaml declares as metrics, metrics_detail.json and
reports/plots/*.csv), and logs them as the `analyze` run of the pipeline's MLflow run tree: the
headline as metrics of that run and of the pipeline run (so the runs table and the compare view
show it), the reports (tables, figures, metrics_detail.json) as artifacts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from locedit.analysis import AnalysisConfig, analyze, read_effects, read_results, write_report
from locedit.analysis.metrics_file import (
    DETAIL_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    flat_metrics,
    write_dvc_files,
)
from locedit.pipeline.common import mark_reports_stale, reports_current, to_container
from locedit.pipeline.costs import read_costs, stage_total
from locedit.storage import remove_outputs
from locedit.tracking.pipeline import save_headline_view, write_run_file

log = logging.getLogger(__name__)


def _stage_seconds(outputs: Path) -> dict[str, float]:
    """Wall time of every stage's latest run from ``costs.json`` (``locedit run`` records each
    invocation; a resumed stage's pieces are summed), and of the last trace and edit
    invocations' own work from their summary.json, named ``<stage>_last_run``."""
    seconds: dict[str, float] = {
        stage: stage_total(entries)["seconds"]
        for stage, entries in read_costs(outputs).items()
        if stage != "analyze" and entries
    }
    for stage in ("trace", "edit"):
        path = outputs / stage / "summary.json"
        try:
            value = json.loads(path.read_text()).get("seconds")
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, int | float):
            seconds[f"{stage}_last_run"] = float(value)
    return seconds


def _inputs(params: DictConfig) -> tuple[Path, Path]:
    outputs = Path(params.paths.outputs)
    return outputs / "trace" / "effects.parquet", outputs / "edit" / "results.parquet"


def run(params: DictConfig) -> None:
    effects_path, results_path = _inputs(params)
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
        log_to_mlflow(params, reports, seconds, dvc_metrics)
    else:
        log.info("analysis.log_mlflow is false: not logging to MLflow")
        write_run_file(params.paths.outputs, "analyze", None, None)


def log_to_mlflow(params: DictConfig, reports: Path, seconds: float, headline: dict) -> str:
    """The analyze run of this pipeline run: the analysis params, the headline (metrics.json,
    flat ``<problem>.<method>.<stat>``) as metrics here and on the pipeline run, the reports as
    artifacts. Returns the analyze run's id."""
    import mlflow
    from mlflow.entities import Metric

    from locedit import tracking

    logged = {"analysis": to_container(params.get("analysis", {}))}
    mlflow_cfg = to_container(params.get("mlflow", {}))
    with tracking.stage_run("analyze", logged, mlflow_cfg, pipeline=params) as run:
        metrics = flat_metrics(headline)
        tracking.log_metrics({**metrics, "analysis.seconds": seconds})
        client = mlflow.MlflowClient()
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            stamp = int(time.time() * 1000)
            client.log_batch(
                parent, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()]
            )
        save_headline_view(client, run.info.experiment_id, list(metrics))
        tracking.log_artifacts(
            [reports / name for name in ("summary.md", "tables.md", METRICS_FILE, DETAIL_FILE)],
            artifact_path="analysis",
        )
        for sub in ("tables", "figures", PLOTS_DIR):
            if (reports / sub).is_dir():
                tracking.log_artifacts(reports / sub, artifact_path=f"analysis/{sub}")
        return run.info.run_id
