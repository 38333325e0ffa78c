"""Stage `trace`: Causal Tracing and representation zeroing of the filtered facts.

Reads outputs/filter/facts.jsonl (and, for STR's pool, outputs/prepare/facts.jsonl); writes outputs/trace/noise.json, effects.parquet (one row
per fact x method x kind x window x layer), grids/ (per-fact arrays), figures/ (PNG),
skipped.json and summary.json; logs params, summary metrics and figures to MLflow. With
``trace.corruption`` including ``str`` (symmetric token replacement, Zhang & Nanda 2024) its
rows have method ``tracing_str`` and the drawn subjects go to str_replacements.json.

noise.json always holds the calibrated Gaussian sigma: Tracing Reversal and Fact Forcing
(tune and edit stages) use the Gaussian s_noise whatever corruption tracing uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from locedit.data.records import read_records
from locedit.models.architecture import n_layers
from locedit.models.snapshot import model_fingerprint
from locedit.pipeline.common import (
    mark_reports_stale,
    model_from_params,
    output_dir,
    to_container,
)
from locedit.storage import (
    atomic_write_text,
    atomic_write_with,
    clean_temporary,
    id_filename,
    output_lock,
    remove_outputs,
)
from locedit.tracing import plots
from locedit.tracing.cache import ResultCache
from locedit.tracing.noise import calibrate_noise
from locedit.tracing.replacement import STR_METHOD, SubjectPool
from locedit.tracing.runner import TraceRun, TraceSettings, trace_records
from locedit.tracking import log_artifacts, log_metrics, stage_run

log = logging.getLogger(__name__)


def cache_dir(params: DictConfig) -> Path:
    """Where per-fact results persist across runs (outside the DVC out, which DVC clears)."""
    configured = params.trace.get("cache_dir")
    return Path(configured) if configured else Path(params.paths.outputs) / "cache" / "trace"


def run(params: DictConfig) -> None:
    settings = TraceSettings.from_config(params.trace)  # refused before anything loads
    out = output_dir(params, "trace")
    with output_lock(out, "trace"):  # one writer, as for edit and tune
        mark_reports_stale(params, "trace")
        _run_locked(params, out, settings)


def _run_locked(params: DictConfig, out: Path, settings: TraceSettings) -> None:
    records = read_records(Path(params.paths.outputs) / "filter" / "facts.jsonl")
    model, tokenizer = model_from_params(params)
    clean_temporary(out)
    clean_temporary(cache_dir(params), min_age_s=3600)  # shared by runs: spare live writers
    remove_outputs(
        out / name for name in ("effects.parquet", "skipped.json", "summary.json", STR_REPLACEMENTS)
    )
    for sub in ("grids", "figures"):
        _clear(out / sub)

    noise = calibrate_noise(
        model,
        tokenizer,
        records,
        float(params.trace.noise_multiplier),
        params.trace.get("noise_sigma"),
    )
    (out / "noise.json").write_text(json.dumps(noise.to_json(), indent=2) + "\n")
    log.info(
        "noise sigma %.4g (%s)", noise.sigma, "calibrated" if noise.calibrated else "from params"
    )

    logged = {
        "model": to_container(params.model),
        "trace": to_container(params.trace),
        "seed": int(params.seed),
    }
    pool = str_pool(params, settings, tokenizer, records) if settings.uses_str else None
    with stage_run("trace", logged, params.mlflow, pipeline=params):
        result = trace_records(
            model,
            tokenizer,
            records,
            settings,
            sigma=noise.sigma,
            seed=int(params.seed),
            fingerprint=model_fingerprint(model),
            cache=ResultCache(cache_dir(params)),
            pool=pool,
        )
        table = result.table()
        atomic_write_with(out / "effects.parquet", lambda tmp: table.to_parquet(tmp, index=False))
        atomic_write_text(out / "skipped.json", json.dumps(result.skipped, indent=2) + "\n")
        logged_files = [out / "noise.json", out / "summary.json", out / "skipped.json"]
        if pool is not None:
            write_replacements(result, pool, int(params.seed), out / STR_REPLACEMENTS)
            logged_files.append(out / STR_REPLACEMENTS)
        write_grids(result, out / "grids")
        figures = write_figures(
            result,
            table,
            settings,
            n_layers(model),
            out / "figures",
            int(params.trace.get("n_heatmaps", 4)),
        )
        summary = summarize(result, table, noise.sigma, len(records), settings.corruption)
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        _log_curves(table)
        log_artifacts(logged_files)
        log_artifacts(figures, artifact_path="figures")
    print(
        f"trace: {summary['n_traced']} facts traced ({result.n_computed} computed, {result.n_cached} "
        f"from cache), {summary['n_skipped']} skipped{_str_note(summary)}, "
        f"{summary['n_low_denominator']} flagged for a "
        f"small p_clean - p_noised; sigma {noise.sigma:.4g}; {len(figures)} figures in {out / 'figures'}"
    )


def str_pool(params: DictConfig, settings: TraceSettings, tokenizer, records) -> SubjectPool:
    """The STR candidates: the prepared data set's subjects (``trace.str_pool: prepare``, the
    default: outputs/prepare/facts.jsonl, a superset of the traced facts) or the traced facts'."""
    outputs = Path(params.paths.outputs)
    if settings.str_pool == "filter":
        return SubjectPool.from_records(tokenizer, records, str(outputs / "filter" / "facts.jsonl"))
    path = outputs / "prepare" / "facts.jsonl"
    return SubjectPool.from_records(tokenizer, read_records(path), str(path))


#: The STR draw of every fact (outputs/trace/), written when trace.corruption includes str.
STR_REPLACEMENTS = "str_replacements.json"


def write_replacements(result: TraceRun, pool: SubjectPool, seed: int, path: Path) -> None:
    """The pool and each fact's replacement subjects (one per sample, in sample order), so an
    STR run can be audited and its draw checked against a rerun."""
    payload = {
        "method": STR_METHOD,
        "seed": seed,
        "pool": pool.to_json(),
        "facts": {fact_id: draw.to_json() for fact_id, draw in result.replacements.items()},
        "skipped": [s for s in result.skipped if s.get("corruption") == "str"],
    }
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def _str_note(summary: dict) -> str:
    if "n_str_traced" not in summary:
        return ""
    return (
        f" (symmetric token replacement: {summary['n_str_traced']} traced, "
        f"{summary['n_str_skipped']} without a same-length subject)"
    )


def _clear(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if child.is_file():
            child.unlink()


def write_grids(result: TraceRun, folder: Path) -> None:
    """One .npz per fact with every grid: ``{method}_{kind}_w{window}_{array}``."""
    per_fact: dict[str, dict[str, np.ndarray]] = {}
    for res in result.tracing:
        arrays = per_fact.setdefault(res.fact_id, _fact_header(res))
        prefix = f"{res.method}_{res.kind}_w{res.window}"
        arrays[f"{prefix}_p_restored"] = res.p_restored
        arrays[f"{prefix}_effect"] = res.effect
        arrays[f"{prefix}_p_clean"] = np.array(res.p_clean)
        arrays[f"{prefix}_p_noised"] = np.array(res.p_noised)
    for res in result.zeroing:
        arrays = per_fact.setdefault(res.fact_id, _fact_header(res))
        prefix = f"zeroing_{res.kind}_w{res.window}"
        arrays[f"{prefix}_p_zeroed"] = res.p_zeroed
        arrays[f"{prefix}_p_zeroed_last"] = res.p_zeroed_last
        arrays[f"{prefix}_effect"] = res.effect
        arrays[f"{prefix}_p_clean"] = np.array(res.p_clean)
    folder.mkdir(parents=True, exist_ok=True)
    for fact_id, arrays in per_fact.items():
        np.savez_compressed(folder / id_filename(fact_id, ".npz"), **arrays)


def _fact_header(res) -> dict[str, np.ndarray]:
    return {
        "fact_id": np.array(res.fact_id),
        "tokens": np.array(res.tokens),
        "subject_span": np.array([res.subject_start, res.subject_end]),
    }


def write_figures(
    result: TraceRun,
    table: pd.DataFrame,
    settings: TraceSettings,
    total: int,
    folder: Path,
    n_heatmaps: int,
) -> list[Path]:
    paths: list[Path] = []
    if table.empty:
        return paths
    default_window = settings.windows[0]
    shown = list(dict.fromkeys(r.fact_id for r in result.tracing))[:n_heatmaps]
    for res in result.tracing:
        if res.fact_id in shown and res.window == default_window:
            swap = "_str" if res.method == STR_METHOD else ""
            name = f"heatmap{swap}_{id_filename(res.fact_id)}_{res.kind}_w{res.window}.png"
            paths.append(plots.plot_fact_heatmap(res, folder / name))
    methods = [m for m in ("tracing", STR_METHOD) if (table.method == m).any()]
    for kind in settings.kinds:
        for window in settings.windows:
            for method in methods:
                stem = "tracing_str_curve" if method == STR_METHOD else "tracing_curve"
                paths.append(
                    plots.plot_layer_curve(
                        table, kind, window, total, folder / f"{stem}_{kind}_w{window}.png", method
                    )
                )
            if len(methods) == 2:
                paths.append(
                    plots.plot_corruption_comparison(
                        table, kind, window, total, folder / f"corruption_{kind}_w{window}.png"
                    )
                )
        paths.append(
            plots.plot_window_comparison(
                table, kind, total, folder / f"window_comparison_{kind}.png"
            )
        )
        if settings.zeroing:
            paths.append(
                plots.plot_zeroing_curve(table, kind, total, folder / f"zeroing_curve_{kind}.png")
            )
    return paths


def summarize(
    result: TraceRun,
    table: pd.DataFrame,
    sigma: float,
    n_facts: int,
    corruption: tuple[str, ...] = ("gaussian",),
) -> dict:
    tracing = table[table.method == "tracing"]
    flagged = tracing[tracing.low_denominator].fact_id.nunique()
    fact_skips = [s for s in result.skipped if "corruption" not in s]
    summary: dict = {
        "n_facts": n_facts,
        "n_traced": len({r.fact_id for r in result.tracing}),
        "n_skipped": len(fact_skips),
        "n_computed": result.n_computed,
        "n_cached": result.n_cached,
        "n_low_denominator": int(flagged),
        "sigma": sigma,
        "seconds": result.seconds,
        "facts_per_second": result.n_computed / result.seconds
        if result.seconds > 0 and result.n_computed
        else float("nan"),
    }
    if "str" in corruption:
        swapped = table[table.method == STR_METHOD]
        summary["corruption"] = list(corruption)
        summary["n_str_traced"] = int(swapped.fact_id.nunique())
        summary["n_str_skipped"] = len(result.skipped) - len(fact_skips)
        summary["n_str_low_denominator"] = int(swapped[swapped.low_denominator].fact_id.nunique())
        summary["n_str_cycled"] = sum(d.cycled for d in result.replacements.values())
    for method in ("tracing", STR_METHOD):
        part = table[table.method == method]
        usable = part[~part.low_denominator]
        for (kind, window), group in usable.groupby(["kind", "window"]):
            curve = group.groupby("layer").effect_max.mean()
            summary[f"{method}.{kind}.w{window}.peak_layer"] = int(curve.idxmax())
            summary[f"{method}.{kind}.w{window}.peak_mean_effect"] = float(curve.max())
    return summary


def _log_curves(table: pd.DataFrame) -> None:
    """Mean effect per layer as a stepped metric (step = layer), so MLflow draws the curve."""
    usable = table[~table.low_denominator]
    for (method, kind, window), part in usable.groupby(["method", "kind", "window"]):
        for layer, value in part.groupby("layer").effect_max.mean().items():
            log_metrics({f"{method}.{kind}.w{window}.mean_effect": value}, step=int(layer))
