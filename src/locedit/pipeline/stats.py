"""Stage ``stats``: key covariances and context templates for every layer ROME/MEMIT will edit.

Reads params (model, stats, edit.layers / edit.n_grid_layers / edit.methods, method, tune) and
fills ``outputs/stats/`` (the :class:`~locedit.editing.CovarianceStore` directory the edit and
tune stages read), plus ``outputs/stats/manifest.json`` listing what was computed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from locedit.editing import (
    CovarianceStore,
    default_layer,
    hparams_for,
    key_stats_methods,
    layers_for,
    sweep_layers,
)
from locedit.models.architecture import n_layers
from locedit.pipeline.common import (
    mark_reports_stale,
    model_from_params,
    output_dir,
    to_container,
)
from locedit.storage import output_lock

log = logging.getLogger(__name__)


def stats_layers(params: DictConfig, model) -> list[int]:
    """Every down-projection a key-statistics method (ROME, MEMIT) may edit in the sweep (and in
    tuning, if enabled)."""
    total = n_layers(model)
    grid = sweep_layers(params.edit, total)
    tune = params.get("tune") or {}
    needed: set[int] = set()
    for method in key_stats_methods(params.edit.methods):
        centres = set(grid)
        if tune.get("enabled"):  # the tune stage edits tune.layer, else the method's default
            layer = tune.get("layer")
            centres.add(int(layer) if layer is not None else default_layer(method, total))
        hp = hparams_for(method, params)
        for centre in centres:
            needed.update(layers_for(method, centre, model, hp))
    return sorted(needed)


def run(params: DictConfig) -> None:
    out = output_dir(params, "stats")
    with output_lock(out, "stats"):  # one writer, as for edit and tune
        mark_reports_stale(params, "stats")
        _run_locked(params, out)


def _run_locked(params: DictConfig, out: Path) -> None:
    from locedit.tracking import log_metrics, stage_run

    model, tokenizer = model_from_params(params)
    store = CovarianceStore.from_params(params, tokenizer)
    layers = stats_layers(params, model)
    started = time.perf_counter()
    config = {"model": to_container(params.model), "stats": to_container(params.stats)}
    with stage_run("stats", config, to_container(params.get("mlflow", {})), pipeline=params):
        paths = store.ensure(model, layers) if layers else []
        templates = {}
        for method in key_stats_methods(params.edit.methods):
            hp = hparams_for(method, params)
            templates[method] = store.context_templates(
                model,
                tokenizer,
                hp.context_template_lengths,
                hp.n_context_templates,
                hp.seed,
                hp.template_top_k,
            )
        seconds = time.perf_counter() - started
        manifest = {
            "model": str(params.model.name),
            "model_fingerprint": store.fingerprint(model),
            "corpus": store.corpus.to_dict(),
            "corpus_id": store.corpus.content_id(),
            "layers": layers,
            "files": [str(Path(p).relative_to(out)) for p in paths],
            "context_templates": templates,
            "seconds": seconds,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        log_metrics({"stats_layers": len(layers), "stats_seconds": seconds})
    log.info("key statistics for %d layers in %s (%.0f s)", len(layers), out, seconds)
