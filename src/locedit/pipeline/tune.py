"""Stage `tune`: an Optuna study per (method, problem) choosing the KL weight (ROME, MEMIT) or
the L-infinity radius (FT-1, FT-5) on the first tuning facts at one layer (paper App. A).

Writes ``outputs/tune/best_hparams.json`` as ``{"hparams": {<problem>: {<method>: {<field>:
value}}}, ...}``, which the edit stage applies over the conf/problem values. With
``tune.enabled: false`` it writes ``{"hparams": {}, "enabled": false}`` at once, so the edit
stage uses the paper's tuned GPT-J values from ``conf/problem/default.yaml``. Values in
``tune.pin`` are written as given and their studies skipped.

Studies live in ``tune.storage`` (default: an SQLite file under ``outputs/tune/state/``, a
DVC-persisted out), so a rerun resumes them; the pre-edit probabilities of each tuning fact
are cached next to them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from locedit import versioning
from locedit.data.records import read_records
from locedit.editing import CovarianceStore, default_layer, get_method, hparams_for
from locedit.editing.grouped import group_size_from
from locedit.metrics.neighborhood_kl import NeighborhoodKLConfig
from locedit.models.architecture import n_layers
from locedit.models.snapshot import model_fingerprint
from locedit.pipeline.common import (
    mark_reports_stale,
    model_from_params,
    output_dir,
    to_container,
)
from locedit.pipeline.edit import evaluation_config
from locedit.storage import atomic_write_text, clean_temporary, output_lock, remove_outputs
from locedit.sweep import resolved_hparams
from locedit.sweep.plan import content_id
from locedit.tracking import stage_run
from locedit.tuning import StudyResult, TuneConfig, TuneTarget, run_study, search_space, study_name

log = logging.getLogger(__name__)

TUNED_FILE = "best_hparams.json"
DISABLED_NOTE = (
    "tuning disabled (tune.enabled: false): the edit stage uses conf/method with "
    "conf/problem overrides, the paper's tuned GPT-J values (App. A)"
)
_FINGERPRINTS: dict[int, str] = {}

#: Packages whose code decides a trial's scores: a change to them starts fresh studies (a resumed
#: study would otherwise keep scores computed by the old code).
SCORING_PACKAGES = ("editing", "metrics", "models", "problems", "sweep", "tracing", "tuning")


def tune_config(params: DictConfig, **overrides: Any) -> TuneConfig:
    return TuneConfig.from_params(
        to_container(params.tune), seed=int(params.get("seed", 0)), **overrides
    )


def pinned_hparams(params: DictConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """``tune.pin``: values the user fixes instead of tuning, validated against the dataclasses."""
    pins = to_container(params.tune.get("pin") or {})
    for methods in pins.values():
        for method, values in (methods or {}).items():
            hparams_for(method, overrides=values)  # raises on an unknown method or field
    return pins


def code_version() -> str:
    """Code version (:func:`locedit.versioning.code_version`) of :data:`SCORING_PACKAGES`."""
    return versioning.code_version(*(f"locedit.{package}" for package in SCORING_PACKAGES))


def _fingerprint(model) -> str:
    if id(model) not in _FINGERPRINTS:
        _FINGERPRINTS[id(model)] = model_fingerprint(model)
    return _FINGERPRINTS[id(model)]


def build_target(
    params: DictConfig, method: str, problem: str, config: TuneConfig
) -> tuple[TuneTarget, str]:
    """The study's model, facts (the first ``tune.n_facts`` filtered facts) and layer, and a
    label of that data slice for the study name."""
    records = read_records(Path(params.paths.outputs) / "filter" / "facts.jsonl")
    if config.n_facts is not None:
        records = records[: config.n_facts]
    if not records:
        raise ValueError("no filtered facts to tune on: run the filter stage first")
    model, tokenizer = model_from_params(params)
    depth = n_layers(model)
    layer = config.layer if config.layer is not None else default_layer(method, depth)
    if not 0 <= layer < depth:
        raise IndexError(f"tune.layer {layer} out of range: the model has layers 0..{depth - 1}")
    plain = to_container(params)
    base = resolved_hparams(plain, [method], [problem])[(method, problem)]
    evaluation = evaluation_config(params)
    # The objective never reads the neighbourhood KL: tuning trials skip it.
    evaluation = replace(
        evaluation, essence=config.objective == "overall_score_with_essence",
        neighborhood_kl=NeighborhoodKLConfig(),
    )
    covariance = (
        CovarianceStore.from_params(params, tokenizer)
        if get_method(method).needs_key_stats
        else None
    )
    context = content_id([_fingerprint(model), evaluation.key_content(), problem, code_version()])
    target = TuneTarget(
        model=model,
        tokenizer=tokenizer,
        covariance=covariance,
        records=records,
        method=method,
        problem=problem,
        layer=layer,
        base_hparams=base,
        evaluation=evaluation,
        cache_dir=output_dir(params, "tune") / "state" / "pre",
        context=context,
        group_size=group_size_from((params.get("edit") or {}).get("group_size"), model),
    )
    dataset = str(params.get("data", {}).get("dataset", "facts"))
    return target, f"{dataset}[:{len(records)}]"


def tune_pair(
    params: DictConfig,
    method: str,
    problem: str,
    config: TuneConfig,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run or resume the study of one (method, problem)."""
    target, data_slice = build_target(params, method, problem, config)
    space = search_space(method, problem, config)
    identity = [
        target.identity(space.fields),
        space.to_dict(),
        config.max_rewrite,
        config.objective,
    ]
    name = study_name(
        str(params.model.name), method, problem, data_slice, target.layer, config.mode, identity
    )
    log.info("study %s (%d facts, layer %d)", name, len(target.records), target.layer)
    return run_study(
        target,
        space,
        config,
        name,
        out_dir=output_dir(params, "tune") / "studies",
        mlflow_cfg=params.get("mlflow"),
        parent_run_id=parent_run_id,
        progress=progress,
    )


def _payload(
    params: DictConfig, config: TuneConfig, pins: dict, results: dict[str, StudyResult]
) -> dict:
    hparams: dict[str, dict[str, dict[str, Any]]] = {}
    for result in results.values():
        chosen = result.selection.params
        if chosen:
            hparams.setdefault(result.space.problem, {})[result.space.method] = dict(chosen)
    for problem, methods in pins.items():
        for method, values in (methods or {}).items():
            hparams.setdefault(problem, {})[method] = dict(values)
    return {
        "hparams": hparams,
        "enabled": True,
        "mode": config.mode,
        "model": str(params.model.name),
        "objective": config.objective,
        "max_rewrite": config.max_rewrite,
        "fallback": config.fallback,
        "pinned": pins,
        "infeasible": sorted(k for k, r in results.items() if not r.selection.feasible),
        "studies": {key: result.to_dict() for key, result in results.items()},
    }


def _write(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def _prepare_dirs(params: DictConfig) -> Path:
    """``outputs/tune`` with its ``studies/`` and persisted ``state/`` folders (DVC outs)."""
    out = output_dir(params, "tune")
    (out / "studies").mkdir(exist_ok=True)
    state = out / "state"
    state.mkdir(exist_ok=True)
    readme = state / "README.txt"
    if not readme.exists():
        readme.write_text(
            "Persistent tuning state (dvc.yaml: persist, not cached): the Optuna SQLite storage of\n"
            "the studies and cached pre-edit probabilities. Delete it to restart every study.\n"
        )
    return out


def _report(results: dict[str, StudyResult]) -> None:
    for key, result in results.items():
        sel = result.selection
        values = ", ".join(
            f"{k}={v:.4g}"
            for k, v in sel.values.items()
            if k in ("mean_rewrite_score", "mean_overall_score")
        )
        flag = "" if sel.feasible else "  NO FEASIBLE TRIAL"
        print(f"  {key:32s} {sel.rule:16s} {sel.params} {values}{flag}")


def run(params: DictConfig) -> None:
    out = output_dir(params, "tune")
    with output_lock(out, "tune"):
        mark_reports_stale(params, "tune")
        clean_temporary(out)
        # An interrupted run must not leave the previous choice looking current.
        remove_outputs([out / TUNED_FILE, out / "studies" / "index.json"])
        _run_locked(params)


def _run_locked(params: DictConfig) -> None:
    out = _prepare_dirs(params)
    config = tune_config(params)
    pins = pinned_hparams(params)
    if not config.enabled:
        _write_disabled(params, out, pins)
        return
    _run_studies(params, out, config, pins)


def _write_disabled(params: DictConfig, out: Path, pins: dict) -> None:
    """``tune.enabled: false``: the file says so at once (a short run of the pipeline tree)."""
    path = out / TUNED_FILE
    with stage_run("tune", {"tune.enabled": False}, params.mlflow, pipeline=params):
        _write(
            path,
            {
                "hparams": pins,
                "enabled": False,
                "pinned": pins,
                "note": DISABLED_NOTE,
                "studies": {},
            },
        )
        (out / "studies" / "index.json").write_text(json.dumps({"studies": []}) + "\n")
    print(f"tune: disabled; wrote {path} (edit uses the conf/problem values)")


def _run_studies(params: DictConfig, out: Path, config: TuneConfig, pins: dict) -> None:
    path = out / TUNED_FILE
    pairs = [
        (m, p)
        for p in params.edit.problems
        for m in params.edit.methods
        if m not in (pins.get(p) or {})
    ]
    results: dict[str, StudyResult] = {}
    logged = {
        "tune": to_container(params.tune),
        "model": str(params.model.name),
        "methods": list(params.edit.methods),
        "problems": list(params.edit.problems),
    }
    with stage_run("tune", logged, params.mlflow, pipeline=params) as parent:
        for method, problem in pairs:
            results[f"{method}/{problem}"] = tune_pair(
                params, method, problem, config, parent.info.run_id
            )
    _write(path, _payload(params, config, pins, results))
    (out / "studies" / "index.json").write_text(
        json.dumps({"studies": {k: r.study_name for k, r in results.items()}}, indent=2) + "\n"
    )
    print(f"tune: {len(results)} studies ({config.mode}); wrote {path}")
    _report(results)
    tuned_path = params.edit.get("tuned_params")
    if tuned_path and Path(tuned_path).resolve() != path.resolve():
        log.warning(
            "edit.tuned_params is %s, not %s: the edit stage will not read these values",
            tuned_path,
            path,
        )


def run_single(
    params: DictConfig, method: str, problem: str, mode: str | None = None
) -> StudyResult:
    """`locedit tune`: one study whatever ``tune.enabled`` says; its choice is merged into
    ``best_hparams.json`` (other pairs are kept) so ``locedit run edit`` uses it. A later
    ``dvc repro`` regenerates that file from the tune config."""
    with output_lock(output_dir(params, "tune"), "tune"):
        return _run_single_locked(params, method.lower(), problem.lower(), mode)


def _run_single_locked(params: DictConfig, method: str, problem: str, mode: str | None) -> StudyResult:
    out = _prepare_dirs(params)
    config = tune_config(params, mode=mode, enabled=True)
    result = tune_pair(params, method, problem, config)
    path = out / TUNED_FILE
    existing = json.loads(path.read_text()) if path.exists() else {}
    pins = pinned_hparams(params)
    payload = _payload(params, config, pins, {f"{method}/{problem}": result})
    merged_hparams = existing.get("hparams", {}) or {}
    problem_entry = dict(merged_hparams.get(problem) or {})
    problem_entry.pop(method, None)
    if result.selection.params:
        problem_entry[method] = dict(result.selection.params)
    merged_hparams[problem] = problem_entry
    merged = {
        **existing,
        **payload,
        "hparams": {p: m for p, m in merged_hparams.items() if m},
        "studies": {**(existing.get("studies") or {}), **payload["studies"]},
    }
    merged["infeasible"] = sorted(
        k for k, s in merged["studies"].items() if not s["selection"]["feasible"]
    )
    _write(path, merged)
    print(f"tune {method}/{problem}: {result.selection.message}")
    _report({f"{method}/{problem}": result})
    return result
