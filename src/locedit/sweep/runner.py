"""Execute a sweep in this process, in local worker processes, or as Ray tasks.

Whatever runs the edits, the driver alone writes rows, each edit is seeded by its own key and
pre-edit values are per fact, so the table does not depend on the executor or the order.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from locedit.data.records import FactRecord
from locedit.sweep.plan import EditTask
from locedit.sweep.store import ResultStore
from locedit.sweep.worker import EvaluationConfig, run_fact

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


@dataclass
class SweepSpec:
    """Everything a worker needs, picklable (plain params, records, tasks, hyperparameters)."""

    params: dict[str, Any]
    records: dict[str, FactRecord]
    tasks: list[EditTask]
    hparams: Mapping[tuple[str, str], Any]
    config: EvaluationConfig
    out_dir: Path
    context: str
    threads: int | None = None


@lru_cache(maxsize=1)
def _worker_state(params_yaml: str):
    """Model, tokenizer and covariance store of a worker process, loaded once per process."""
    from locedit.editing import CovarianceStore
    from locedit.params import model_from_params

    params = OmegaConf.create(params_yaml)
    model, tokenizer = model_from_params(params)
    return model, tokenizer, CovarianceStore.from_params(params, tokenizer)


def _run_fact_job(
    spec: SweepSpec, fact_id: str, tasks: list[EditTask], on_row: Callable[[dict], None] | None = None
) -> list[dict]:
    """One fact's edits; rows go to ``on_row`` as they finish, or back to the driver at the end."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model, tokenizer, covariance = _worker_state(OmegaConf.to_yaml(OmegaConf.create(spec.params)))
    rows: list[dict] = []
    run_fact(model, tokenizer, covariance, spec.records[fact_id], tasks, spec.hparams, spec.config,
             on_row or rows.append, spec.out_dir / "pre", spec.context)
    return rows


def pending_jobs(tasks: Sequence[EditTask], done: set[str]) -> dict[tuple[str, str], list[EditTask]]:
    """The tasks not yet done, one job per (fact, method).

    A fact's pre-edit values are cached on disk, so splitting its edits by method costs little
    and keeps workers evenly loaded; a killed parallel run loses at most one job per worker.
    """
    grouped: dict[tuple[str, str], list[EditTask]] = defaultdict(list)
    for task in tasks:
        if task.key not in done:
            grouped[(task.fact_id, task.method)].append(task)
    return dict(grouped)


def run_sweep(
    spec: SweepSpec, executor: str = "local", workers: int = 1, ray_address: str | None = None,
    progress: bool = True,
) -> int:
    """Run every task not yet in the store; returns how many edits ran now."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {EXECUTORS}")
    store = ResultStore(spec.out_dir)
    store.repair()
    pending = pending_jobs(spec.tasks, store.done_keys())
    n_pending = sum(len(t) for t in pending.values())
    skipped = len(spec.tasks) - n_pending
    if skipped:
        log.info("resuming: %d of %d edits already done", skipped, len(spec.tasks))
    bar = tqdm(total=n_pending, desc="edits", unit="edit", disable=not progress or n_pending == 0)

    def record(rows: list[dict]) -> None:
        store.append(rows)
        bar.update(len(rows))

    try:
        if executor == "local" and workers <= 1:
            for (fact_id, _), tasks in pending.items():
                _run_fact_job(spec, fact_id, tasks, on_row=lambda row: record([row]))
        elif executor == "local":
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_run_fact_job, spec, f, t) for (f, _), t in pending.items()]
                for future in as_completed(futures):
                    record(future.result())
        else:
            _run_ray(spec, pending, workers, ray_address, record)
    finally:
        bar.close()
    return n_pending


def _run_ray(spec: SweepSpec, pending, workers: int, address: str | None, record) -> None:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else max(workers, 1),
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        remote = ray.remote(num_cpus=spec.threads or 1)(_run_fact_job)
        spec_ref = ray.put(spec)
        refs = [remote.remote(spec_ref, fact_id, tasks) for (fact_id, _), tasks in pending.items()]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            record(ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()
