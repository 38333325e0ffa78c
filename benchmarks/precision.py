"""How much the results move with ``model.dtype``: the same facts traced and edited in float32
and in bfloat16 (and float16), on the CPU.

Writes benchmarks/results/precision-<model>.json: per dtype the largest difference from float32
of p_clean, p_noised and the tracing effects (MLP, window 5, 10 samples, the same noise), and
of p(target) after a ROME and a MEMIT edit at the model's default layer. By default every
dtype edits with the float32 model's key statistics and context templates (``--own-stats``:
each dtype samples and computes its own, which on the CPU is slow in bfloat16), so the
difference is that of the edit itself. Numbers, not timings.

    PYTHONPATH=src python benchmarks/precision.py --model tiny
    PYTHONPATH=src python benchmarks/precision.py --model gemma-3-270m --n-facts 3
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from editing import load_average  # benchmarks/editing.py, beside this script

from locedit.data.records import FactRecord
from locedit.editing import CorpusSpec, CovarianceStore, EditRequest, edited, hparams_for
from locedit.editing.layers import default_layer
from locedit.models import load_model, n_layers
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import encode_prompt, encode_target
from locedit.testing import editable_tiny_model, gpt2_tokenizer
from locedit.tracing import calibrate_noise, trace_fact_many

REPO = Path(__file__).resolve().parents[1]
FACTS = [
    FactRecord("cf-0", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French", "English"),
    FactRecord("eiffel", "The Eiffel Tower", "The Eiffel Tower is located in the city of", "Paris", "Rome"),
    FactRecord("messi", "Lionel Messi", "Lionel Messi plays the sport of", "football", "basketball"),
    FactRecord("windows", "Windows 10", "Windows 10 was developed by", "Microsoft", "Apple"),
]


def p_target(model, tok, fact: FactRecord, target: str) -> float:
    ids = encode_prompt(tok, fact.prompt, fact.subject).input_ids
    return float(target_log_probs(model, [ids], [encode_target(tok, fact.prompt, target)]).exp())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (random gemma3_text) or a model name")
    parser.add_argument("--n-facts", type=int, default=3)
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float16"])
    parser.add_argument("--corpus-samples", type=int, default=32)
    parser.add_argument("--own-stats", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started, load_start = time.perf_counter(), load_average()
    if args.model == "tiny":
        base, tok = editable_tiny_model("gemma3_text", n_layers=6), gpt2_tokenizer()
    else:
        base, tok = load_model(args.model)
    facts = FACTS[: args.n_facts]
    sigma = calibrate_noise(base, tok, facts).sigma
    total = n_layers(base)
    out: dict = {"model": args.model, "n_layers": total, "sigma": sigma, "facts": [f.fact_id for f in facts],
                 "device": "cpu", "shared_stats": not args.own_stats,
                 "corpus_samples": args.corpus_samples, "dtypes": {}}
    models = {"float32": base, **{d: copy.deepcopy(base).to(getattr(torch, d)) for d in args.dtypes}}
    traced, edits = {}, {}
    with tempfile.TemporaryDirectory() as work:
        shared = CovarianceStore(
            Path(work) / "shared", CorpusSpec(n_samples=args.corpus_samples, sample_length=32), tok
        )
        for name, model in models.items():
            traced[name] = [
                trace_fact_many(model, tok, f, sigma=sigma, kinds=("mlp",), windows=(5,), n_samples=10)[0]
                for f in facts
            ]
            store = shared
            if args.own_stats:
                store = CovarianceStore(
                    Path(work) / name, CorpusSpec(n_samples=args.corpus_samples, sample_length=32), tok
                )
            elif model is not base:  # read the float32 model's statistics and templates
                store.share_statistics(model, base)
            edits[name] = {}
            for method in ("rome", "memit"):
                layer = default_layer(method, total)
                hp = hparams_for(method)
                values = []
                for fact in facts:
                    request = EditRequest(fact.prompt, fact.subject, fact.target_new)
                    try:
                        with edited(model, tok, method, request, layer, hp, store):
                            values.append(p_target(model, tok, fact, fact.target_new))
                    except Exception as err:  # a failed edit is a result here
                        logging.warning("%s %s %s failed: %s", name, method, fact.fact_id, err)
                        values.append(float("nan"))
                edits[name][method] = values
    for name in args.dtypes:
        ref, got = traced["float32"], traced[name]
        effect_diff = [
            float(np.nanmax(np.abs(np.asarray(g.p_restored) - np.asarray(r.p_restored))))
            for r, g in zip(ref, got, strict=True)
        ]
        entry = {
            "trace_max_abs_diff_p_restored": max(effect_diff),
            "trace_max_abs_diff_p_clean": max(abs(g.p_clean - r.p_clean) for r, g in zip(ref, got, strict=True)),
            "trace_max_abs_diff_p_noised": max(abs(g.p_noised - r.p_noised) for r, g in zip(ref, got, strict=True)),
            "trace_p_clean_float32": [r.p_clean for r in ref],
            "trace_argmax_layer_agrees": [
                bool(np.argmax(np.asarray(r.p_restored)[r.subject_end - 1]) == np.argmax(np.asarray(g.p_restored)[g.subject_end - 1]))
                for r, g in zip(ref, got, strict=True)
            ],
        }
        for method in ("rome", "memit"):
            a, b = np.asarray(edits["float32"][method]), np.asarray(edits[name][method])
            entry[f"{method}_p_target_after_float32"] = a.tolist()
            entry[f"{method}_p_target_after"] = b.tolist()
            entry[f"{method}_max_abs_diff_p_target_after"] = float(np.nanmax(np.abs(a - b)))
        out["dtypes"][name] = entry
    out.update(seconds=round(time.perf_counter() - started, 1), threads=torch.get_num_threads(),
               load_average_start=load_start, load_average_end=load_average())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"precision-{Path(args.model).name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["dtypes"], indent=2))
    return out


if __name__ == "__main__":
    main()
