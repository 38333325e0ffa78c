"""Stage `filter`: keep the facts the model knows (paper App. A) and log the counts."""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from locedit.data.filter import FilterConfig, filter_known_facts
from locedit.data.records import read_records, write_records
from locedit.models.snapshot import model_fingerprint
from locedit.pipeline.common import (
    mark_reports_stale,
    model_from_params,
    output_dir,
    to_container,
)
from locedit.storage import atomic_write_text, remove_outputs
from locedit.tracking import log_metrics, stage_run

log = logging.getLogger(__name__)


def run(params: DictConfig) -> None:
    out = output_dir(params, "filter")
    mark_reports_stale(params, "filter")
    remove_outputs([out / "report.json"])  # an interrupted run leaves no previous report
    records = read_records(output_dir(params, "prepare") / "facts.jsonl")
    model, tokenizer = model_from_params(params)
    cfg = params.data
    config = FilterConfig(
        max_new_tokens=int(cfg.filter.max_new_tokens),
        batch_size=int(cfg.filter.batch_size),
        erasure_min_prob=float(cfg.filter.erasure_min_prob),
        max_facts=None if cfg.max_facts is None else int(cfg.max_facts),
        require_known=bool(cfg.filter.get("require_known", True)),
        min_p_true=None if cfg.filter.get("min_p_true") is None else float(cfg.filter.min_p_true),
    )
    result = filter_known_facts(model, tokenizer, records, config)
    write_records(out / "facts.jsonl", result.kept)
    n_erasure = sum(bool(r.extra.get("erasure_ok")) for r in result.kept)
    summary = {
        "model": str(params.model.name),
        "model_fingerprint": model_fingerprint(model),
        "candidates": result.n_candidates,
        "scanned": result.n_scanned,
        "known": result.n_known,
        "kept": len(result.kept),
        "erasure_eligible": n_erasure,
        "completion_accuracy": result.completion_accuracy,
        "dropped": dict(result.dropped),
    }
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    logged = {"model": to_container(params.model), "data": to_container(params.data)}
    with stage_run("filter", logged, params.mlflow, pipeline=params):
        log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        log_metrics({f"dropped.{k}": v for k, v in result.dropped.items()})
    print(
        f"filter: kept {len(result.kept)} of {result.n_candidates} facts "
        f"(scanned {result.n_scanned}, model knows {result.n_known}; completion accuracy {result.completion_accuracy:.1%}; "
        f"{n_erasure} eligible for Fact Erasure)"
    )
    for reason, count in result.dropped.most_common():
        print(f"  dropped {count:4d}: {reason}")
    if not result.kept:
        raise SystemExit(
            f"filter: no fact of the {result.n_candidates} candidates passed (see the reasons above "
            f"and {out / 'report.json'}); read more records (data.n_records), or relax "
            "data.filter.min_p_true / data.filter.require_known"
        )
