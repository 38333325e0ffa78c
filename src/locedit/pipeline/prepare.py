"""Stage `prepare`: read the configured data set, validate records, keep the slice."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from locedit.data.loaders import load_dataset
from locedit.data.records import write_records
from locedit.pipeline.common import mark_reports_stale, output_dir, to_container
from locedit.storage import atomic_write_text, remove_outputs
from locedit.tracking import log_metrics, stage_run

log = logging.getLogger(__name__)


def run(params: DictConfig) -> None:
    logged = {"data": to_container(params.data)}
    with stage_run("prepare", logged, params.get("mlflow"), pipeline=params):
        report = _prepare(params)
        log_metrics({"valid_records": report["valid_records"], "written": report["written"]})


def _prepare(params: DictConfig) -> dict:
    cfg = params.data
    out = output_dir(params, "prepare")
    mark_reports_stale(params, "prepare")
    remove_outputs([out / "report.json"])  # an interrupted run leaves no previous report
    result = load_dataset(cfg.dataset, Path(cfg.root), float(cfg.max_bad_fraction))
    start = int(cfg.start)
    stop = None if cfg.n_records is None else start + int(cfg.n_records)
    records = result.records[start:stop]
    write_records(out / "facts.jsonl", records)
    report = {
        "dataset": cfg.dataset,
        "valid_records": len(result.records),
        "skipped": dict(result.skipped),
        "skipped_records": result.problems[:100],
        "slice": [start, stop],
        "written": len(records),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    log.info(
        "prepare: %d records from %s (slice %d:%s; %d invalid records skipped: %s)",
        len(records), cfg.dataset, start, stop, result.n_skipped, dict(result.skipped),
    )
    return report
