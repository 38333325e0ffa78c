"""Causal Tracing throughput: the exact fast path vs the straightforward reference algorithm.

Runs both paths on the same model, facts and noise in one process and writes
benchmarks/results/tracing.json: facts/s of each path, the speed-up, the max abs difference of
the effects, peak memory, model, facts and threads.

    .venv/bin/python benchmarks/tracing.py                  # Gemma-3-270M, 4 facts, 2 threads
    .venv/bin/python benchmarks/tracing.py --facts-file outputs/filter/facts.jsonl --n-facts 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from locedit.data.records import FactRecord, read_records
from locedit.models import load_model, n_layers
from locedit.tracing import calibrate_noise, trace_fact, trace_fact_reference

log = logging.getLogger("benchmarks.tracing")

#: Facts Gemma-3-270M knows (greedy completion contains the object), with the subject at the
#: start, middle and end of the prompt, since the subject's position drives the speed-up.
DEFAULT_FACTS = [
    FactRecord("cf-0", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French"),
    FactRecord("eiffel", "The Eiffel Tower", "The Eiffel Tower is located in the city of", "Paris"),
    FactRecord("messi", "Lionel Messi", "Lionel Messi plays the sport of", "football"),
    FactRecord("hamlet", "Hamlet", "The play Hamlet was written by", "William Shakespeare"),
    FactRecord("windows", "Windows 10", "Windows 10 was developed by", "Microsoft"),
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default="cpu", help="model.device: cpu (default), auto, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", help="model.dtype: float32, bfloat16, float16")
    parser.add_argument("--n-facts", type=int, default=4)
    parser.add_argument(
        "--facts-file",
        type=Path,
        default=None,
        help="FactRecord JSON lines (default: built-in facts)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kind", default="mlp", choices=["mlp", "attn", "resid"])
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "tracing.json"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    torch.set_num_threads(args.threads)
    facts = (read_records(args.facts_file) if args.facts_file else DEFAULT_FACTS)[: args.n_facts]
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    sigma = calibrate_noise(model, tokenizer, facts).sigma
    common = {
        "sigma": sigma,
        "seed": args.seed,
        "kind": args.kind,
        "window": args.window,
        "n_samples": args.samples,
    }
    load_start = os.getloadavg()
    with torch.no_grad():  # warm-up: first calls pay one-off allocation costs
        model(input_ids=torch.tensor([[tokenizer.bos_token_id or 0] * 8], device=model.device))
    rss_loaded = peak_rss_mb()

    fast, t0 = [], time.perf_counter()
    for fact in facts:
        fast.append(trace_fact(model, tokenizer, fact, **common))
        log.info("fast      %-10s %.1f s so far", fact.fact_id, time.perf_counter() - t0)
    fast_s = time.perf_counter() - t0
    rss_fast = peak_rss_mb()

    ref, t0 = [], time.perf_counter()
    for fact in facts:
        ref.append(trace_fact_reference(model, tokenizer, fact, **common))
        log.info("reference %-10s %.1f s so far", fact.fact_id, time.perf_counter() - t0)
    ref_s = time.perf_counter() - t0
    rss_ref = peak_rss_mb()

    per_fact = [
        {
            "fact_id": f.fact_id,
            "prompt": f.prompt,
            "subject": f.subject,
            "target_true": f.target_true,
            "n_tokens": len(a.tokens),
            "subject_span": [a.subject_start, a.subject_end],
            "p_clean": a.p_clean,
            "p_noised": a.p_noised,
            "low_denominator": bool(a.low_denominator),
            "max_abs_diff_effect": float(np.abs(a.effect - b.effect).max()),
            "max_abs_diff_p": float(np.abs(a.p_restored - b.p_restored).max()),
        }
        for f, a, b in zip(facts, fast, ref, strict=True)
    ]
    result = {
        "model": args.model,
        "n_layers": n_layers(model),
        "kind": args.kind,
        "window": args.window,
        "noise_samples": args.samples,
        "sigma": sigma,
        "threads": args.threads,
        "n_facts": len(facts),
        "facts": per_fact,
        "fast_seconds": fast_s,
        "reference_seconds": ref_s,
        "fast_facts_per_s": len(facts) / fast_s,
        "reference_facts_per_s": len(facts) / ref_s,
        "speedup": ref_s / fast_s,
        "max_abs_diff_effect": max(f["max_abs_diff_effect"] for f in per_fact),
        "max_abs_diff_effect_max": float(
            max(np.abs(a.effect_max - b.effect_max).max() for a, b in zip(fast, ref, strict=True))
        ),
        "max_abs_diff_p": max(f["max_abs_diff_p"] for f in per_fact),
        "peak_rss_mb": {
            "after_load": rss_loaded,
            "after_fast": rss_fast,
            "after_reference": rss_ref,
        },
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "reference_algorithm": "one patched forward of the full model (logits at every position) per "
        "(token, layer window), batched over noise samples only (ROME's calculate_hidden_flow)",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"tracing benchmark on {args.model}, {len(facts)} facts, {args.threads} threads: fast "
        f"{result['fast_facts_per_s']:.4f} facts/s, reference {result['reference_facts_per_s']:.4f} facts/s, "
        f"speed-up {result['speedup']:.1f}x, max |effect difference| {result['max_abs_diff_effect']:.2e}; "
        f"wrote {args.output}"
    )
    return result


if __name__ == "__main__":
    main()
