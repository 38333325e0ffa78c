"""Stage `edit`: the resumable sweep over facts x layers x methods x problems, in MLflow (the
stage's run, with a nested run per (method, problem) timed as its edits ran)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from locedit.data.records import read_records
from locedit.metrics.neighborhood_kl import NeighborhoodKLConfig
from locedit.models.architecture import n_layers
from locedit.models.snapshot import model_fingerprint
from locedit.params import model_depth
from locedit.pipeline.common import (
    mark_reports_stale,
    model_from_params,
    output_dir,
    to_container,
)
from locedit.problems import NoiseConfig
from locedit.storage import (
    Interrupted,
    atomic_write_text,
    atomic_write_with,
    clean_temporary,
    output_lock,
    remove_outputs,
)
from locedit.sweep import (
    EvaluationConfig,
    ResultStore,
    SweepSpec,
    plan_tasks,
    resolved_hparams,
    results_table,
    run_sweep,
    sweep_layers,
)
from locedit.sweep.plan import content_id
from locedit.tracking import (
    log_artifacts,
    log_metrics,
    stage_run,
    timed_child_run,
)

log = logging.getLogger(__name__)

METRIC_COLUMNS = [
    "rewrite_score", "paraphrase_score", "neighborhood_score", "essence_score",
    "overall_score", "overall_score_with_essence", "neighborhood_kl",
]
#: Optional metric columns every results table carries, NaN where the option was off.
OPTIONAL_COLUMNS = ("neighborhood_kl",)


def noise_config(params: DictConfig) -> NoiseConfig:
    """The tracing stage's calibrated sigma (or the pinned ``trace.noise_sigma``)."""
    sigma = params.trace.get("noise_sigma")
    if sigma is None:
        path = Path(params.paths.outputs) / "trace" / "noise.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the trace stage first (dvc repro trace)")
        sigma = json.loads(path.read_text())["sigma"]
    return NoiseConfig(float(sigma), int(params.trace.noise_samples), int(params.seed))


def tuned_hparams(params: DictConfig) -> dict:
    """Hyperparameters chosen by the tune stage, when it wrote any."""
    path = params.edit.get("tuned_params")
    if not path:
        return {}
    if not Path(path).exists():
        log.warning("edit.tuned_params %s not found (run the tune stage): using conf/method values", path)
        return {}
    return json.loads(Path(path).read_text()).get("hparams", {}) or {}


def evaluation_config(params: DictConfig) -> EvaluationConfig:
    essence = params.edit.get("essence", {}) or {}
    return EvaluationConfig(
        noise=noise_config(params),
        essence=bool(essence.get("enabled", True)),
        essence_samples=int(essence.get("n_samples", 5)),
        essence_top_k=int(essence.get("top_k", 5)),
        essence_max_new_tokens=int(essence.get("max_new_tokens", 30)),
        seed=int(params.seed),
        neighborhood_target=str(params.edit.get("neighborhood_target", "o_false")),
        essence_span=str(essence.get("span", "continuation")),
        neighborhood_kl=NeighborhoodKLConfig.from_mapping(params.edit.get("neighborhood_kl")),
    )


def with_optional_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every optional metric column, NaN where its option was off."""
    for column in OPTIONAL_COLUMNS:
        if column not in table.columns:
            table[column] = float("nan")
    return table


def build_spec(params: DictConfig) -> SweepSpec:
    records = read_records(Path(params.paths.outputs) / "filter" / "facts.jsonl")
    cfg = params.edit
    if cfg.get("max_facts") is not None:
        records = records[: int(cfg.max_facts)]
    model, _ = model_from_params(params)
    layers = sweep_layers(cfg, n_layers(model))
    plain = to_container(params)
    hparams = resolved_hparams(plain, list(cfg.methods), list(cfg.problems), tuned_hparams(params))
    config = evaluation_config(params)
    context = content_id([model_fingerprint(model), config.key_content()])
    tasks = plan_tasks(records, layers, hparams, context)
    return SweepSpec(
        params=plain, records={r.fact_id: r for r in records}, tasks=tasks, hparams=hparams,
        config=config, out_dir=output_dir(params, "edit"), context=context,
        threads=cfg.get("threads"),
    )


class SweepClock:
    """When each (method, problem)'s edits ran, from the rows as the driver stores them: a
    batch (one fact x method job) ended on arrival and began its edits' seconds earlier."""

    def __init__(self) -> None:
        self.spans: dict[tuple[str, str], tuple[int, int]] = {}

    def record(self, rows: list[dict]) -> None:
        now = int(time.time() * 1000)
        began = now - int(1000 * sum(float(r.get("seconds") or 0.0) for r in rows))
        for row in rows:
            pair = (str(row.get("method")), str(row.get("problem")))
            start, end = self.spans.get(pair, (began, now))
            self.spans[pair] = (min(start, began), max(end, now))


def log_sweep(
    table: pd.DataFrame, spec: SweepSpec, parent_id: str, clock: SweepClock, idle_ms: int
) -> None:
    """A nested run per (method, problem) spanning its edits that ran now (``idle_ms`` for
    both ends when none ran): hyperparameters and mean metrics per layer."""
    ok = table[table["status"] == "ok"] if "status" in table else table
    for (method, problem), hparams in spec.hparams.items():
        start, end = clock.spans.get((method, problem), (idle_ms, idle_ms))
        logged = {"method": method, "problem": problem, **hparams.to_dict()}
        with timed_child_run(parent_id, "edit", f"{method}/{problem}", logged, start, end):
            subset = ok[(ok["method"] == method) & (ok["problem"] == problem)]
            for layer, group in subset.groupby("layer"):
                means = {c: group[c].mean() for c in METRIC_COLUMNS if c in group}
                log_metrics(means, step=int(layer))
            rows = table[(table["method"] == method) & (table["problem"] == problem)]
            log_metrics({
                "edits_ok": float((rows["status"] == "ok").sum()),
                "edits_failed": float((rows["status"] == "failed").sum()),
                "edits_skipped": float((rows["status"] == "skipped").sum()),
                "seconds_per_edit": float(subset["seconds"].mean()) if len(subset) else float("nan"),
            })


#: What the stage writes at the end; removed at its start so an interrupted run leaves none.
FINAL_OUTPUTS = ("results.parquet", "results.csv", "summary.json")


def check(params: DictConfig) -> None:
    """Refuse bad layers (from the model's config, no weights) and hyperparameters of any
    (method, problem) before the run clears the previous outputs or loads the model."""
    cfg = params.edit
    sweep_layers(cfg, model_depth(params))
    resolved_hparams(to_container(params), list(cfg.methods), list(cfg.problems), tuned_hparams(params))


def run(params: DictConfig) -> None:
    check(params)
    out = output_dir(params, "edit")
    with output_lock(out, "edit"):
        mark_reports_stale(params, "edit")
        clean_temporary(out)
        remove_outputs(out / name for name in FINAL_OUTPUTS)
        try:
            _run_locked(params)
        except KeyboardInterrupt:
            kept = len(ResultStore(out).done_keys())
            raise Interrupted(f"interrupted: {kept} edits kept, rerun to resume") from None


def _run_locked(params: DictConfig) -> None:
    spec = build_spec(params)
    cfg = params.edit
    out = spec.out_dir
    logged = {k: to_container(params[k]) for k in ("model", "edit", "method", "problem", "trace")}
    with stage_run("edit", logged, params.mlflow, pipeline=params) as parent:
        start = time.perf_counter()
        clock = SweepClock()
        ran = run_sweep(
            spec, cfg.get("executor", "local"), int(cfg.get("workers", 1)), cfg.get("ray_address"),
            gpus_per_worker=float(cfg.get("gpus_per_worker", 1.0)), on_rows=clock.record,
        )
        elapsed = time.perf_counter() - start
        table = with_optional_columns(results_table(ResultStore(out).rows(), [t.key for t in spec.tasks]))
        missing = len(spec.tasks) - len(table)
        if missing:
            raise RuntimeError(
                f"edit: {missing} of {len(spec.tasks)} edits have no result row in {out / 'rows'}; "
                "rerun the stage to compute them"
            )
        atomic_write_with(out / "results.parquet", lambda tmp: table.to_parquet(tmp, index=False))
        atomic_write_with(out / "results.csv", lambda tmp: table.to_csv(tmp, index=False))
        counts = table["status"].value_counts().to_dict() if len(table) else {}
        summary = {"edits": len(table), "ran_now": ran, "seconds": elapsed, **{f"status_{k}": v for k, v in counts.items()}}
        log_metrics({k: float(v) for k, v in summary.items()})
        log_artifacts([out / "results.csv"], "edit")
        log_sweep(table, spec, parent.info.run_id, clock, int(time.time() * 1000))
        # Last: the summary says the stage finished.
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        log_artifacts([out / "summary.json"], "edit")
    failed = table[table["status"] == "failed"] if len(table) else table
    print(f"edit: {len(table)} edits ({counts}); ran {ran} now in {elapsed:.0f} s")
    for reason, count in (failed["reason"].value_counts().items() if len(failed) else []):
        print(f"  failed {count:4d}: {reason}")
