"""Stage `filter`: keep the facts the model knows (paper App. A) and log the counts.

The scan's result is also kept in ``<paths.outputs>/cache/filter/<key>/``, keyed by the model
fingerprint, the candidate records' content, the filter settings and the code that filters
(:mod:`locedit.versioning`): a rerun with nothing changed (``make scale`` resuming after a kill,
a ``dvc repro`` forced by an unrelated dependency) reads it instead of generating again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from locedit.data.filter import FilterConfig, FilterResult, filter_known_facts
from locedit.data.records import FactRecord, read_records, write_records
from locedit.models.snapshot import model_fingerprint
from locedit.pipeline.common import (
    mark_reports_stale,
    model_from_params,
    output_dir,
    to_container,
)
from locedit.storage import atomic_write_text, remove_outputs
from locedit.tracking import log_metrics, stage_run
from locedit.versioning import content_key

log = logging.getLogger(__name__)


def cache_key(fingerprint: str, records: list[FactRecord], config: FilterConfig) -> str:
    """What the scan's result depends on: model, candidates (their content), settings, code."""
    content = json.dumps([r.to_json() for r in records], sort_keys=True, default=str)
    return content_key(
        "filter",
        model=fingerprint,
        record=hashlib.sha256(content.encode()).hexdigest(),
        params=dataclasses.asdict(config),
        code=["locedit.data.filter"],
    )


def cached_result(folder: Path) -> FilterResult | None:
    """The result kept in ``folder``, or None when there is none (or it is unreadable)."""
    try:
        counts = json.loads((folder / "result.json").read_text())
        kept = read_records(folder / "facts.jsonl")
    except (OSError, ValueError):
        return None
    return FilterResult(kept, int(counts["n_candidates"]), int(counts["n_known"]),
                        Counter(counts["dropped"]), int(counts["n_scanned"]))


def keep_result(folder: Path, result: FilterResult) -> None:
    """Write the result into ``folder``; result.json last, so a kill leaves no readable half."""
    folder.mkdir(parents=True, exist_ok=True)
    write_records(folder / "facts.jsonl", result.kept)
    counts = {"n_candidates": result.n_candidates, "n_known": result.n_known,
              "n_scanned": result.n_scanned, "dropped": dict(result.dropped)}
    atomic_write_text(folder / "result.json", json.dumps(counts, indent=2) + "\n")


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
    fingerprint = model_fingerprint(model)
    cached = Path(params.paths.outputs) / "cache" / "filter" / cache_key(fingerprint, records, config)
    result = cached_result(cached)
    if result is None:
        result = filter_known_facts(model, tokenizer, records, config)
        keep_result(cached, result)
    else:
        log.info("filter: the same scan was done before; its result is read from %s", cached)
    write_records(out / "facts.jsonl", result.kept)
    n_erasure = sum(bool(r.extra.get("erasure_ok")) for r in result.kept)
    summary = {
        "model": str(params.model.name),
        "model_fingerprint": fingerprint,
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
