"""How ROME's and MEMIT's updates and p(o_false) move with the key-statistics corpus size.

Issue 16, item 6, scaled down to what a shared 2-core machine allows: for each corpus size
(texts of 64 tokens sampled from the model, as the stats stage does), edit the first 3
CounterFact facts at layer 9 of Gemma-3-270M with ROME and MEMIT (the defaults `locedit
compose` gives the model) and record p(o_false) after the edit and the weight change dW over
layers 7-11; the changes are compared, by cosine and relative distance, with those of the
reference size. Writes benchmarks/results/stats_size.json.

    .venv/bin/python benchmarks/stats_size.py --n-texts 16 32 64 100 --reference 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from editing import editable_facts, load_average  # benchmarks/editing.py, beside this script

from locedit.editing import CorpusSpec, CovarianceStore, EditRequest, edited, hparams_for
from locedit.editing.methods import get_method
from locedit.models import load_model, n_layers
from locedit.models.architecture import down_proj_weight
from locedit.models.loading import default_cache_dir
from locedit.models.scoring import target_log_probs

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-texts", type=int, nargs="+", default=[16, 32, 64, 100])
    parser.add_argument("--reference", type=int, default=64)
    parser.add_argument("--n-facts", type=int, default=3)
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "stats_size.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load_average()
    model, tok = load_model("gemma-3-270m")
    config = {
        "method": yaml.safe_load((REPO / "conf" / "method" / "default.yaml").read_text()),
        "model": {"name": "gemma-3-270m"},
    }
    facts = editable_facts(tok, args.data_root, args.n_facts)
    window = get_method("memit").layers(args.layer, n_layers(model), hparams_for("memit"))
    rows, deltas, stats_s = [], {}, {}
    for n in sorted(set(args.n_texts) | {args.reference}):
        t0 = time.perf_counter()
        store = CovarianceStore(
            default_cache_dir() / "benchmark-stats", CorpusSpec(n_samples=n, sample_length=64), tok
        )
        store.ensure(model, window)
        stats_s[n] = time.perf_counter() - t0
        for method in ("rome", "memit"):
            hp = hparams_for(method, config)
            for record, ids, target in facts:
                request = EditRequest(record.prompt, record.subject, record.target_new)
                before = {x: down_proj_weight(model, x).detach().clone() for x in window}
                with edited(model, tok, method, request, args.layer, hp, store) as result:
                    p_after = float(target_log_probs(model, [ids], [target]).exp())
                    delta = torch.cat(
                        [(down_proj_weight(model, x).detach() - before[x]).flatten() for x in window]
                    ).double()
                deltas[(method, record.fact_id, n)] = delta
                rows.append(
                    {
                        "n_texts": n, "method": method, "fact_id": record.fact_id,
                        "p_after": p_after, "delta_norm": float(delta.norm()),
                        "update_norm_ratio": result.diagnostics.get("update_norm_ratio"),
                        "flags": list(result.flags),
                    }
                )
    for row in rows:
        ref = deltas[(row["method"], row["fact_id"], args.reference)]
        own = deltas[(row["method"], row["fact_id"], row["n_texts"])]
        row["cos_to_reference"] = float(own @ ref / (own.norm() * ref.norm()))
        row["relative_distance_to_reference"] = float((own - ref).norm() / ref.norm())
    result = {
        "benchmark": "stats_size", "model": "gemma-3-270m", "layer": args.layer,
        "reference_n_texts": args.reference, "sample_length": 64,
        "stats_seconds": {str(k): v for k, v in stats_s.items()},
        "rows": rows, "threads": args.threads, "load_average_start": load_start,
        "load_average_end": load_average(),
        "note": "stats_seconds is 0-2 s where the statistics were cached by an earlier run",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
