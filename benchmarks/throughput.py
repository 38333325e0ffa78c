"""Edits per second at each group size (issue 28): shared by ``benchmarks/editing.py`` and
``benchmarks/gpu_check.py``, so it imports only torch and locedit's editing and sweep-worker
code (the GPU machine has no mlflow, omegaconf or datasets)."""

from __future__ import annotations

import logging
import math
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from locedit.editing import EditFailed, EditRequest, edited
from locedit.editing.methods import get_method
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import encode_prompt, encode_target

log = logging.getLogger("benchmarks.throughput")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_mb(device: torch.device) -> float:
    """Peak memory so far: the accelerator's allocations, else the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


@contextmanager
def _clocked(device: torch.device) -> Iterator[dict[str, float]]:
    """Time the body: the accelerator synchronised at both ends and its peak-memory counter
    reset first; the wall seconds land in the yielded dict's ``seconds``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    clock = {"seconds": math.nan}
    start = time.perf_counter()
    yield clock
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock["seconds"] = time.perf_counter() - start


def _share_end(budget, methods_left: int) -> float:
    """When this method's equal share of what is left of ``budget`` ends (never without one)."""
    return time.perf_counter() + budget.left() / methods_left if budget else math.inf


def _over(share_end: float, n_edits: int, done: dict) -> bool:
    """Whether ``n_edits`` at the last measured size's rate would not fit in the share left."""
    left = share_end - time.perf_counter()
    rate = next((r["edits_per_second"] for r in reversed(done.values())
                 if "edits_per_second" in r), None)
    return left <= 0 or bool(rate and n_edits / rate > left)


def grouped_throughput(
    model, tokenizer, store, requests: list[EditRequest], layers: list[int],
    hparams: dict, sizes: tuple[int, ...] = (1, 4, 16, 64), min_edits: int = 4,
    budget=None,
) -> dict:
    """Edits per second per method when G independent edits run their optimisations (v*/z*,
    finetuning) as one batch (issue 28; :func:`locedit.editing.editor.optimise_together`), at
    each G in ``sizes``.

    An edit is the whole edit in :func:`~locedit.editing.edited` from its batched v*/z*,
    plus p(target) on the edited model. The edits cycle through ``requests`` x ``layers``
    (groups differ in fact and in layer); each size runs at least ``min_edits`` edits (G = 1
    is the sequential editor); methods that cannot batch are measured at G = 1 only, a size
    whose batch a method refuses (e.g. finetuning a module that is not Linear or Conv1D) is
    recorded as refused; with a ``budget`` (``.left()`` seconds) each method gets an equal
    share of it, and a size that would not fit in what is left of that share (at the last
    size's rate) is skipped.
    Also reports the largest p(target) difference to the G = 1 run of the same edits and the
    peak memory (the accelerator's, else the process's resident set, which never falls).
    """
    from locedit.editing.editor import optimise_together
    from locedit.editing.types import GroupedEdit
    from locedit.models.device import model_device

    device = model_device(model)
    pairs = [(r, layer) for layer in layers for r in requests]
    out: dict[str, dict] = {}
    for index, (method, hp) in enumerate(hparams.items()):
        batched = get_method(method).groupable
        rows, reference = {}, {}
        share_end = _share_end(budget, len(hparams) - index)
        for size in sizes if batched else sizes[:1]:
            n_edits = max(size, min_edits)
            if _over(share_end, n_edits, rows):
                rows[str(size)] = {"skipped": "over the time budget"}
                continue
            edits = [GroupedEdit(method, *pairs[i % len(pairs)], hp) for i in range(n_edits)]
            probs, failed, refused = [], 0, None
            with _clocked(device) as clock:
                for first in range(0, n_edits, size):
                    group = edits[first : first + size]
                    try:
                        given = (
                            optimise_together(model, tokenizer, group, store)
                            if size > 1 and batched else [()] * len(group)
                        )
                    except ValueError as err:  # e.g. finetuning a non-Linear/Conv1D module
                        refused = str(err)
                        break
                    for edit, vstars in zip(group, given, strict=True):
                        request = edit.request
                        ids = encode_prompt(tokenizer, request.prompt, request.subject)
                        target = encode_target(tokenizer, request.prompt, request.target)
                        try:
                            with edited(model, tokenizer, method, request, edit.layer, hp, store,
                                        (), vstars):
                                log_p = target_log_probs(model, [ids.input_ids], [target])
                                probs.append(float(log_p.exp()))
                        except EditFailed:
                            failed += 1
                            probs.append(float("nan"))
            seconds = clock["seconds"]
            if refused is not None:
                rows[str(size)] = {"refused": refused}
                log.info("%s G=%d refused: %s", method, size, refused)
                continue
            if size == sizes[0]:
                reference = dict(enumerate(probs))
            diffs = [
                abs(p - reference[i]) / max(abs(reference[i]), 1e-30)
                for i, p in enumerate(probs)
                if i in reference and not (math.isnan(p) or math.isnan(reference[i]))
            ]
            rows[str(size)] = {
                "edits": n_edits,
                "failed": failed,
                "seconds": round(seconds, 3),
                "edits_per_second": n_edits / seconds,
                "peak_mb": round(peak_mb(device), 1),
                "max_relative_p_difference_to_first_size": max(diffs) if diffs else None,
            }
            log.info("%s G=%d: %.2f edits/s", method, size, rows[str(size)]["edits_per_second"])
        out[method] = rows
    return out


def _row_label(rows: list[dict], key: str) -> str:
    row = next(r for r in rows if r["key"] == key)
    return f"{row['fact_id']} {row['method']} layer {row['layer']}"


def sweep_throughput(
    model, tokenizer, store, records: list, layers: list[int], hparams: dict,
    sizes: tuple[int, ...], problem: str = "error_injection", min_edits: int | None = None,
    budget=None, config=None,
) -> dict:
    """Edits per second per method of the sweep's own worker
    (:func:`locedit.sweep.worker.run_facts`: every edit with all its metrics) at each
    ``edit.group_size`` in ``sizes``: one job per method over all ``records``, as the sweep's
    jobs of several facts, so groups hold a fact's layers and cross from one fact to the next.

    The edits are ``records`` x ``layers`` in the sweep's fact-major order: all of them
    (``min_edits`` None), or the first max(G, ``min_edits``), cycling through them again as
    further edits of their own (the GPU check's sizes outgrow its few facts). Untimed first:
    one edit of each fact (the first method at the first layer), which fills the pre-edit
    cache (the probes' values and the essence samples, once per fact in a sweep). With a
    ``budget`` (``.left()`` seconds) each method gets an equal share of it and a size that
    would not fit in what is left of the share (at the last size's rate) is skipped. Also
    reports peak memory and the largest difference of any number in the rows to the first
    size's same edit, relative to max(|value|, 1e-6), with where the largest ones are.
    """
    from locedit.models.device import model_device
    from locedit.models.noise import NoiseConfig
    from locedit.sweep.plan import EditTask
    from locedit.sweep.worker import EvaluationConfig, run_facts

    device = model_device(model)
    config = config or EvaluationConfig(NoiseConfig(0.1, 3, 0), essence_samples=3)
    pairs = [(record.fact_id, layer) for record in records for layer in layers]
    methods = list(hparams)
    by_pair = {(m, problem): hp for m, hp in hparams.items()}
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as cache:

        def run(tasks: list, size: int, rows: list) -> None:
            run_facts(model, tokenizer, store, records, tasks, by_pair, config, rows.append,
                      Path(cache), "bench", group_size=size)

        run([EditTask(r.fact_id, layers[0], methods[0], problem, "warm-up") for r in records],
            1, [])
        for index, method in enumerate(methods):
            share_end = _share_end(budget, len(methods) - index)
            rows_by_size: dict[str, dict] = {}
            first: dict | None = None
            for size in sizes if get_method(method).groupable else sizes[:1]:
                n_edits = len(pairs) if min_edits is None else max(size, min_edits)
                if _over(share_end, n_edits, rows_by_size):
                    rows_by_size[str(size)] = {"skipped": "over the time budget"}
                    continue
                tasks = [
                    EditTask(*pairs[i % len(pairs)], method, problem, f"bench-{i // len(pairs)}")
                    for i in range(n_edits)
                ]
                rows: list[dict] = []
                with _clocked(device) as clock:
                    run(tasks, size, rows)
                seconds = clock["seconds"]
                values = {
                    (r["key"], k): v for r in rows for k, v in r.items()
                    if isinstance(v, float) and k != "seconds" and not math.isnan(v)
                }
                first = first if first is not None else values
                # relative, but to at least 1e-6: a score of an edit that changed nothing is
                # rounding
                diffs = {k: abs(v - first[k]) / max(abs(first[k]), 1e-6)
                         for k, v in values.items() if k in first}
                worst = sorted(diffs, key=diffs.get, reverse=True)[:5]
                rows_by_size[str(size)] = {
                    "edits": len(rows),
                    "ok": sum(r["status"] == "ok" for r in rows),
                    "seconds": round(seconds, 3),
                    "edits_per_second": len(rows) / seconds,
                    "peak_mb": round(peak_mb(device), 1),
                    "max_relative_metric_difference_to_first_size": max(diffs.values(), default=None),
                    # where the largest differences are: (row's fact, method and layer, column)
                    "largest_differences": [
                        [_row_label(rows, key), column, diffs[(key, column)]]
                        for key, column in worst
                    ],
                }
                log.info("sweep %s group_size=%d: %.2f edits/s", method, size,
                         rows_by_size[str(size)]["edits_per_second"])
            out[method] = rows_by_size
    return out
