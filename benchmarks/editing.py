"""Seconds per edit of ROME, MEMIT, FT-1, FT-5, EMMET and AlphaEdit on the bundled model at a
middle layer.

Edits the first CounterFact facts towards o_false (Error Injection) through
``locedit.editing.edited`` with the hyperparameters ``locedit compose`` gives the model
(``conf/method/default.yaml`` with its ``per_model`` section, no problem overrides) and writes benchmarks/results/editing.json: seconds per edit per
method (mean, median, each fact), p(o_false) before and after, the one-time costs (model
fingerprint, context templates, key statistics), peak memory, threads and machine load, and
ROME's v* against the original compute_v on the same batches in the same run (speed-up and
largest difference). EMMET and AlphaEdit (beyond the paper, README) have no original
implementation in-process: their rows report seconds and p(o_false) only, and say so. An edit
that fails (``EditFailed``, e.g. AlphaEdit with an empty null space) is counted and its reason
kept. The whole run is kept under ``--budget-s``: a method that would overrun it edits fewer
facts, and the JSON says so.

    .venv/bin/python benchmarks/editing.py                    # Gemma-3-270M, 10 facts, 2 threads
    .venv/bin/python benchmarks/editing.py --n-facts 3 --methods rome ft1
    .venv/bin/python benchmarks/editing.py --methods memit emmet alphaedit
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
import yaml
from throughput import grouped_throughput, peak_rss_mb, sweep_throughput

from locedit.data.loaders import load_counterfact
from locedit.editing import (
    ALL_METHODS,
    CorpusSpec,
    CovarianceStore,
    EditFailed,
    EditRequest,
    edited,
    get_method,
    hparams_for,
    key_stats_methods,
    layers_for,
)
from locedit.editing.alphaedit import null_space_for
from locedit.editing.batch import request_batch
from locedit.editing.reference import optimise_vstar_reference
from locedit.editing.vstar import optimise_vstar
from locedit.models import load_model, n_layers
from locedit.models.architecture import component_module
from locedit.models.loading import default_cache_dir
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import TokenizationError, encode_prompt, encode_target

log = logging.getLogger("benchmarks.editing")
REPO = Path(__file__).resolve().parents[1]


def editable_facts(tokenizer, data_root: Path, n_facts: int) -> list[tuple]:
    """The first ``n_facts`` CounterFact records whose prompt and o_false tokenise, each as
    (record, prompt ids, target ids): the facts every editing benchmark edits."""
    facts = []
    for record in load_counterfact(data_root).records:
        try:
            ids = encode_prompt(tokenizer, record.prompt, record.subject).input_ids
            target = encode_target(tokenizer, record.prompt, record.target_new)
        except TokenizationError:
            continue
        facts.append((record, ids, target))
        if len(facts) == n_facts:
            break
    return facts


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def compare_with_reference(model, tokenizer, store, facts, layer: int) -> dict:
    """ROME's v* (about 95% of an edit) ours vs the original compute_v, same batch, same run.

    The reference forwards the whole model with logits at every position at every step
    (:mod:`locedit.editing.reference`); ours replays the frozen lower layers and the prompt
    prefix and unembeds only the target and KL positions. Both give the same v*.
    """
    hp = hparams_for("rome")  # the paper's ROME; the comparison is about speed and equality
    templates = store.context_templates(
        model, tokenizer, hp.context_template_lengths, hp.n_context_templates, hp.seed
    )
    module = component_module(model, "mlp", layer)
    ours_s, reference_s, diffs = [], [], []
    for record, _, _ in facts:
        request = EditRequest(record.prompt, record.subject, record.target_new)
        batch = request_batch(model, tokenizer, request, templates, hp)
        t0 = time.perf_counter()
        ours = optimise_vstar(model, batch, module, layer, hp, "maximize", "rome").target
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reference = optimise_vstar_reference(model, batch, module, hp, "maximize")
        reference_s.append(time.perf_counter() - t0)
        diffs.append(float((ours - reference).abs().max() / reference.abs().max()))
        log.info(
            "v* %s: ours %.1f s, reference %.1f s, max relative difference %.2e",
            record.fact_id, ours_s[-1], reference_s[-1], diffs[-1],
        )
    return {
        "facts": [record.fact_id for record, _, _ in facts],
        "rows_per_batch": int(batch.size),
        "seconds_ours": [round(x, 3) for x in ours_s],
        "seconds_reference": [round(x, 3) for x in reference_s],
        "speedup": sum(reference_s) / sum(ours_s),
        "max_relative_difference": max(diffs),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default="cpu", help="model.device: cpu (default), auto, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", help="model.dtype: float32, bfloat16, float16")
    parser.add_argument("--n-facts", type=int, default=10)
    parser.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument(
        "--methods", nargs="+", default=list(ALL_METHODS), choices=list(ALL_METHODS)
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--stats-dir",
        type=Path,
        default=default_cache_dir() / "benchmark-stats",
        help="key statistics cache, reused across runs (keyed by model and corpus)",
    )
    parser.add_argument(
        "--corpus-samples",
        type=int,
        default=64,
        help="key-statistics corpus size (params stats.n_samples, 200 by default, "
        "costs proportionally more once; it does not change the seconds per edit)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=900.0, help="wall-clock budget of the whole run"
    )
    parser.add_argument(
        "--reference-facts",
        type=int,
        default=3,
        help="facts on which ROME's v* is also run the straightforward way (0: skip)",
    )
    parser.add_argument(
        "--group-sizes", type=int, nargs="*", default=[],
        help="also measure edits per second with G independent edits' v*/z* batched, at each "
        "G (issue 28), e.g. 1 4 16 64; the edits cycle through the facts at --group-layers",
    )
    parser.add_argument(
        "--sweep-group-sizes", type=int, nargs="*", default=[],
        help="also run the sweep's worker (every metric, essence included; one job per method "
        "over all the facts, so groups cross facts) on the facts at --group-layers with each "
        "edit.group_size, e.g. 1 4 12 (the CPU default's measurement)",
    )
    parser.add_argument(
        "--group-layers", type=int, nargs="*", default=None,
        help="layers the grouped edits cycle through (default: the edit layer and its two "
        "neighbours)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "editing.json"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    started = time.perf_counter()
    load_start = load_average()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    depth = n_layers(model)
    layer = args.layer if args.layer is not None else depth // 2

    facts = editable_facts(tokenizer, args.data_root, args.n_facts)

    # One-time costs, reported apart from the per-edit seconds.
    store = CovarianceStore(
        args.stats_dir, CorpusSpec(n_samples=args.corpus_samples, sample_length=64), tokenizer
    )
    t0 = time.perf_counter()
    fingerprint = store.fingerprint(model)
    fingerprint_s = time.perf_counter() - t0
    # The defaults `locedit compose` gives this model (conf/method, with its per_model section).
    method_config = {
        "method": yaml.safe_load((REPO / "conf" / "method" / "default.yaml").read_text()),
        "model": {"name": args.model},
    }
    hparams = {m: hparams_for(m, method_config) for m in args.methods}
    needed = sorted(
        {
            x
            for m in key_stats_methods(args.methods)
            for x in layers_for(m, layer, model, hparams[m])
        }
    )
    t0 = time.perf_counter()
    cached = all(store.path(model, x).exists() for x in needed)
    store.ensure(model, needed)
    stats_s = time.perf_counter() - t0
    templates_s = {}
    for method in key_stats_methods(args.methods):
        t0 = time.perf_counter()
        hp = hparams[method]
        store.context_templates(
            model, tokenizer, hp.context_template_lengths, hp.n_context_templates, hp.seed
        )
        templates_s[method] = time.perf_counter() - t0
    for method in key_stats_methods(args.methods):  # factorise covariances outside the timing
        hp = hparams[method]
        for x in layers_for(method, layer, model, hp):
            if hasattr(hp, "covariance_ridge"):  # ROME, MEMIT, EMMET: Cholesky factors
                store.solver(model, x, hp.covariance_ridge)
            if hasattr(hp, "nullspace_threshold"):  # AlphaEdit: null-space projectors
                null_space_for(store, model, x, hp.nullspace_threshold, hp.nullspace_relative)
    setup_s = time.perf_counter() - started

    per_method: dict[str, dict] = {}
    remaining_methods = list(args.methods)
    for method in args.methods:
        remaining_methods.remove(method)
        budget = (args.budget_s - (time.perf_counter() - started)) / (len(remaining_methods) + 1)
        method_start = time.perf_counter()
        seconds, before, after, edit_layers, flags, failures = [], [], [], None, 0, []
        for record, ids, target in facts:
            request = EditRequest(record.prompt, record.subject, record.target_new)
            p_before = float(target_log_probs(model, [ids], [target]).exp())
            try:
                with edited(
                    model, tokenizer, method, request, layer, hparams[method], store
                ) as result:
                    p_after = float(target_log_probs(model, [ids], [target]).exp())
            except EditFailed as err:
                log.warning("%s %s: %s", method, record.fact_id, err)
                failures.append({"fact": record.fact_id, "reason": err.reason})
                continue
            seconds.append(result.seconds)
            before.append(p_before)
            after.append(p_after)
            edit_layers = result.layers
            flags += bool(result.flags)
            log.info(
                "%s %s: %.1f s, p(o_false) %.4f -> %.4f",
                method,
                record.fact_id,
                result.seconds,
                p_before,
                p_after,
            )
            spent = time.perf_counter() - method_start
            if spent + statistics.mean(seconds) > budget and len(seconds) < len(facts):
                log.warning(
                    "%s: stopping after %d facts to stay within the budget", method, len(seconds)
                )
                break
        if not seconds:
            per_method[method] = {"n_facts": 0, "n_failed": len(failures), "failures": failures}
            continue
        per_method[method] = {
            "layers": edit_layers,
            "n_facts": len(seconds),
            "seconds_mean": statistics.mean(seconds),
            "seconds_median": statistics.median(seconds),
            "seconds_min": min(seconds),
            "seconds_max": max(seconds),
            "seconds": [round(s, 3) for s in seconds],
            "p_target_before_mean": statistics.mean(before),
            "p_target_after_mean": statistics.mean(after),
            "n_flagged": flags,
            "n_failed": len(failures),
            "failures": failures,
            "peak_rss_mb_after": peak_rss_mb(),
            "hparams": hparams[method].to_dict(),
            "reference": (
                "rome_vstar_vs_reference (ROME's v* against the original compute_v)"
                if method == "rome"
                else "none in-process: not in the paper, no original implementation to compare"
                if not get_method(method).in_paper
                else "none in-process"
            ),
        }
        if len(seconds) + len(failures) < len(facts):
            per_method[method]["note"] = (
                f"reduced from {len(facts)} facts to stay within --budget-s {args.budget_s:g}"
            )

    reference = (
        compare_with_reference(model, tokenizer, store, facts[: args.reference_facts], layer)
        if args.reference_facts and "rome" in args.methods
        else None
    )

    grouped = None
    group_layers = args.group_layers or [x for x in (layer - 1, layer, layer + 1)
                                         if 0 <= x < depth]
    if args.group_sizes:
        requests = [EditRequest(r.prompt, r.subject, r.target_new) for r, _, _ in facts]
        grouped = {
            "layers": group_layers,
            "sizes": args.group_sizes,
            "methods": grouped_throughput(
                model, tokenizer, store, requests, group_layers,
                {m: hparams[m] for m in args.methods}, tuple(args.group_sizes),
            ),
        }

    sweep_grouped = None
    if args.sweep_group_sizes:
        sweep_grouped = {
            "layers": group_layers,
            "methods": list(args.methods),
            "sizes": sweep_throughput(
                model, tokenizer, store, [r for r, _, _ in facts], group_layers,
                {m: hparams[m] for m in args.methods}, tuple(args.sweep_group_sizes),
            ),
        }

    result = {
        "benchmark": "editing",
        "model": args.model,
        "model_fingerprint": fingerprint,
        "n_layers": depth,
        "layer": layer,
        "problem": "error_injection (maximise p(o_false) of CounterFact facts)",
        "facts": [record.fact_id for record, _, _ in facts],
        "methods": per_method,
        "rome_vstar_vs_reference": reference,
        "grouped": grouped,
        "sweep_grouped": sweep_grouped,
        "one_time": {
            "model_fingerprint_s": fingerprint_s,
            "key_statistics_s": stats_s,
            "key_statistics_cached": cached,
            "key_statistics_layers": needed,
            "corpus": store.corpus.to_dict(),
            "context_templates_s": templates_s,
            "setup_total_s": setup_s,
        },
        "total_s": time.perf_counter() - started,
        "peak_rss_mb": peak_rss_mb(),
        "threads": args.threads,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "note": (
            "Seconds per edit are EditResult.seconds (the edit itself; restoring the weights and "
            "evaluation are outside). The one-time costs are paid once per model and process "
            "(statistics once per corpus, cached on disk). A load average above the core count "
            "means other processes shared the CPU and the seconds are inflated."
        ),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.output)
    if reference:
        log.info(
            "ROME v*: %.1fx the original compute_v, max relative difference %.1e",
            reference["speedup"], reference["max_relative_difference"],
        )
    for method, row in per_method.items():
        if not row["n_facts"]:
            log.info("%-9s every edit failed: %s", method, row["failures"][:1])
            continue
        log.info(
            "%-9s %5.1f s per edit (median %.1f) over %d facts; p(o_false) %.3f -> %.3f",
            method,
            row["seconds_mean"],
            row["seconds_median"],
            row["n_facts"],
            row["p_target_before_mean"],
            row["p_target_after_mean"],
        )
    return result


if __name__ == "__main__":
    main()
