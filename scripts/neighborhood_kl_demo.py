"""A small extra run for the README's neighbourhood KL: the sweep's own worker on a few
CounterFact facts, FT-1 (no key statistics needed) at a few layers of the bundled model,
with and without the CounterFact+ prefix.

    PYTHONPATH=src python scripts/neighborhood_kl_demo.py [n_facts] [layer ...]

Prints one line per (prefix, layer): mean neighbourhood score and mean neighbourhood KL.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from locedit.data.loaders import load_counterfact
from locedit.metrics.neighborhood_kl import NeighborhoodKLConfig
from locedit.params import model_from_params
from locedit.pipeline.common import compose_params, to_container
from locedit.problems import NoiseConfig
from locedit.sweep import EvaluationConfig, plan_tasks, resolved_hparams, run_facts


def main(n_facts: int = 3, layers: tuple[int, ...] = (3, 9, 15)) -> None:
    params = compose_params("conf", ["edit.methods=[ft1]", "edit.problems=[error_injection]"])
    model, tokenizer = model_from_params(params)
    records = [
        r for r in load_counterfact(Path(params.data.root)).records if r.neighborhood_prompts
    ][:n_facts]
    hparams = resolved_hparams(to_container(params), ["ft1"], ["error_injection"])
    base = EvaluationConfig(NoiseConfig(0.1, 1, 0), essence=False)
    for prefix in ("edit", "none"):
        config = replace(base, neighborhood_kl=NeighborhoodKLConfig(enabled=True, prefix=prefix))
        rows: list[dict] = []
        with tempfile.TemporaryDirectory() as cache:
            for record in records:
                tasks = plan_tasks([record], list(layers), hparams, prefix)
                run_facts(
                    model,
                    tokenizer,
                    None,
                    [record],
                    tasks,
                    hparams,
                    config,
                    rows.append,
                    Path(cache),
                    prefix,
                )
        for layer in layers:
            ok = [r for r in rows if r["layer"] == layer and r["status"] == "ok"]
            if not ok:
                print(f"prefix={prefix} layer={layer}: no successful edit")
                continue
            score = sum(r["neighborhood_score"] for r in ok) / len(ok)
            kl = sum(r["neighborhood_kl"] for r in ok) / len(ok)
            print(
                f"prefix={prefix} layer={layer} edits={len(ok)} "
                f"neighborhood_score={score:.4f} neighborhood_kl={kl:.4g}"
            )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*(args[:1] or [3]), *([tuple(args[1:])] if len(args) > 1 else []))
