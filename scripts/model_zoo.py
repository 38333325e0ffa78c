"""Run the model zoo (``make zoo``): every entry of transformers' causal-LM auto mapping, built
tiny and random, traced and edited exactly or refused in one line (:mod:`locedit.zoo`).

Each family runs in its own forked process with a time limit, so a crash, a hang or a memory
blow-up of one family is recorded as that family's failure and the run goes on. Writes the
table to ``docs/models.md`` (and every row, tracebacks included, to ``--json``); exits 1 when
any family failed. Offline, CPU only.

    python scripts/model_zoo.py                      # the whole zoo -> docs/models.md
    python scripts/model_zoo.py --families gpt2 llama --output /tmp/zoo.md
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import locedit.editing.finetune  # noqa: E402,F401 - imported once here, not in every fork
import locedit.tracing  # noqa: E402,F401
from locedit.testing import gpt2_tokenizer  # noqa: E402
from locedit.zoo import Outcome, causal_lm_families, check_family, covariance_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _child(family: str, model_class: str, folder: str, methods, connection) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # edits' quality flags: the zoo checks restoration only
    tokenizer = gpt2_tokenizer()
    outcome = check_family(
        family,
        tokenizer,
        lambda: covariance_store(Path(folder), tokenizer),
        model_class=model_class,
        methods=methods,
    )
    connection.send(outcome.to_dict())
    connection.close()


def run_family(family: str, model_class: str, timeout: float, methods=None) -> Outcome:
    """:func:`check_family` in a forked process; a timeout or a dead child is a failure."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"zoo-{family}-") as folder:
        process = context.Process(target=_child, args=(family, model_class, folder, methods, send))
        process.start()
        send.close()
        row = receive.recv() if receive.poll(timeout) else None
        process.join(5 if row is not None else 0)
        if process.is_alive():
            process.kill()
            process.join()
    seconds = round(time.perf_counter() - start, 1)
    if row is not None:
        return Outcome(**row)
    reason = (
        f"timed out after {timeout:.0f} s"
        if process.exitcode in (None, -9)
        else f"the process died (exit code {process.exitcode})"
    )
    return Outcome(family, model_class, "fail", reason, seconds)


def markdown(outcomes: list[Outcome], note: str) -> str:
    counts = {
        s: sum(o.status == s for o in outcomes) for s in ("pass", "refused", "unbuilt", "fail")
    }
    lines = [
        "# Model zoo",
        "",
        "Every entry of transformers' causal-LM auto mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), "
        f"transformers {transformers.__version__}, torch {torch.__version__}, built tiny and "
        "random (2 layers, width 64, GPT-2's tokenizer) and checked by `scripts/model_zoo.py` "
        "(`make zoo`; what each check does: `src/locedit/zoo.py`). Generated; do not edit.",
        "",
        "- **pass**: discovery and the load-time checks pass; fast Causal Tracing equals the "
        "reference for mlp, attn and resid and zeroing equals plain forwards (relative "
        "tolerance, `locedit.models.tolerance`); every editing method at the first and the last "
        "layer leaves the weights bit-exact (also when the `edited` block raises).",
        "- **refused**: locedit says in one line what it does not support.",
        "- **unbuilt**: no tiny random model can be built offline from the config alone.",
        "- **fail**: a crash or a mismatch (none should be listed).",
        "",
        f"{counts['pass']} pass, {counts['refused']} refused, {counts['unbuilt']} unbuilt, "
        f"{counts['fail']} fail. {note}",
        "",
        "| family | transformers class | status | reason | seconds |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        reason = o.reason.replace("|", "\\|")
        lines.append(f"| {o.family} | {o.model_class} | {o.status} | {reason} | {o.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", help="model_types to run (default: all)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per family")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "models.md")
    parser.add_argument("--json", type=Path, help="every row with tracebacks, as JSON")
    parser.add_argument(
        "--methods", nargs="*", help="editing methods (default: every registered one; none: skip)"
    )
    parser.add_argument(
        "--note",
        default="Seconds are wall-clock per family on the machine that generated the table.",
    )
    args = parser.parse_args(argv)
    families = causal_lm_families()
    wanted = args.families or list(families)
    unknown = [f for f in wanted if f not in families]
    if unknown:
        parser.error(f"not in the causal-LM auto mapping: {', '.join(unknown)}")
    outcomes = []
    start = time.perf_counter()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for index, family in enumerate(wanted):
        outcome = run_family(family, families[family], args.timeout, args.methods)
        outcomes.append(outcome)
        print(f"{family:28s} {outcome.status:8s} {outcome.seconds:6.1f}s {outcome.reason[:150]}")
        sys.stdout.flush()
        left = len(wanted) - index - 1
        # Rewritten after every family: an interrupted run leaves a table that says so.
        total = f" The whole run took {time.perf_counter() - start:.0f} s."
        note = args.note + (f" Interrupted run: {left} families not yet checked." if left else total)
        args.output.write_text(markdown(outcomes, note))
    if args.json:
        args.json.write_text(json.dumps([o.to_dict() for o in outcomes], indent=1))
    failed = [o.family for o in outcomes if o.status == "fail"]
    print(
        f"{len(outcomes)} families, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
