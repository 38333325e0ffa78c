"""Execute a sweep in this process, in local worker processes, or as Ray tasks.

Whatever runs the edits, the driver alone writes rows, each edit is seeded by its own key and
pre-edit values are per fact, so the table does not depend on the executor or the order.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from queue import Empty
from typing import Any

import torch
from tqdm.auto import tqdm

from locedit.data.records import FactRecord
from locedit.editing.grouped import group_size_from, largest_group
from locedit.models.device import assign_gpus, resolve_device, visible_gpus
from locedit.sweep.plan import EditTask
from locedit.sweep.store import ResultStore
from locedit.sweep.worker import EvaluationConfig, run_facts

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
    from omegaconf import OmegaConf

    from locedit.editing import CovarianceStore
    from locedit.params import model_from_params

    params = OmegaConf.create(params_yaml)
    model, tokenizer = model_from_params(params)
    return model, tokenizer, CovarianceStore.from_params(params, tokenizer)


def _run_job(
    spec: SweepSpec, fact_ids: Sequence[str], tasks: list[EditTask],
    on_row: Callable[[dict], None],
) -> None:
    """One job's edits (one method, one or more facts); each row goes to ``on_row`` as it
    finishes."""
    from omegaconf import OmegaConf

    if spec.threads:
        torch.set_num_threads(spec.threads)
    model, tokenizer, covariance = _worker_state(OmegaConf.to_yaml(OmegaConf.create(spec.params)))
    group_size = group_size_from(_group_setting(spec.params), model)
    run_facts(model, tokenizer, covariance, [spec.records[f] for f in fact_ids], tasks,
              spec.hparams, spec.config, on_row, spec.out_dir / "pre", spec.context,
              spec.records, group_size)


def _group_setting(params: Mapping[str, Any]) -> int | None:
    return (params.get("edit") or {}).get("group_size")


#: A job: the method and the facts whose edits of it run together in one worker call.
JobKey = tuple[str, tuple[str, ...]]


def pending_jobs(
    tasks: Sequence[EditTask], done: set[str], facts_per_job: int = 1
) -> dict[JobKey, list[EditTask]]:
    """The tasks not yet done, one job per method and ``facts_per_job`` facts (in the plan's
    order).

    A fact's pre-edit values are cached on disk, so splitting its edits by method costs little
    and keeps workers evenly loaded (workers send each row as it finishes, so a killed run
    loses only the edits in flight). Several facts to a job let ``edit.group_size`` batch edits
    of several facts (issue 28): :func:`facts_per_job`.
    """
    if facts_per_job < 1:
        raise ValueError(f"facts_per_job must be >= 1, got {facts_per_job}")
    pending = [task for task in tasks if task.key not in done]
    facts: dict[str, dict[str, None]] = defaultdict(dict)  # method -> its facts, in order
    for task in pending:
        facts[task.method].setdefault(task.fact_id)
    chunk_of: dict[tuple[str, str], tuple[str, ...]] = {}
    for method, ids in facts.items():
        ordered = list(ids)
        for start in range(0, len(ordered), facts_per_job):
            chunk = tuple(ordered[start : start + facts_per_job])
            chunk_of.update({(method, fact_id): chunk for fact_id in chunk})
    jobs: dict[JobKey, list[EditTask]] = defaultdict(list)
    for task in pending:
        jobs[(task.method, chunk_of[(task.method, task.fact_id)])].append(task)
    return dict(jobs)


def facts_per_job(
    params: Mapping[str, Any], tasks: Sequence[EditTask], ray_gpus: float | None = None
) -> int:
    """How many facts a job holds so that a group of ``edit.group_size`` edits can fill up:
    the largest group on the workers' device (:func:`locedit.editing.grouped.largest_group`,
    :func:`_workers_device`) over a fact's edits of one method and problem (its layers),
    rounded up; 1 when edits run one at a time."""
    size = largest_group(_group_setting(params), _workers_device(params, ray_gpus))
    if size <= 1 or not tasks:
        return 1
    per_fact = Counter((t.fact_id, t.method, t.problem) for t in tasks)
    return max(1, math.ceil(size / max(per_fact.values())))


def _workers_device(params: Mapping[str, Any], ray_gpus: float | None = None) -> torch.device:
    """Where the workers' models will be, as the driver can tell without loading one:
    ``model.device`` ``cuda``/``cuda:N`` a GPU (the driver itself may have none, e.g. the
    head of a Ray cluster), ``cpu`` the CPU, ``auto`` a GPU when the workers get one: on Ray
    when ``ray_gpus`` (the GPUs the workers' actors take, :func:`_ray_gpus`) is above 0,
    whatever the driver has; locally when this machine sees one."""
    setting = str((params.get("model") or {}).get("device", "auto")).strip().lower()
    if setting.startswith("cuda"):
        return torch.device("cuda")
    if setting == "auto" and ray_gpus is not None:
        return torch.device("cuda" if ray_gpus > 0 else "cpu")
    return resolve_device("cpu" if setting == "cpu" else "auto")


def _ray_gpus(ray, gpus_per_worker: float) -> float:
    """The cluster's GPUs the sweep's Ray workers use: all of them on actors of
    ``gpus_per_worker`` each, none when that is 0 (plain CPU tasks)."""
    return float(ray.cluster_resources().get("GPU", 0)) if gpus_per_worker > 0 else 0.0


def run_sweep(
    spec: SweepSpec, executor: str = "local", workers: int = 1, ray_address: str | None = None,
    progress: bool = True, gpus_per_worker: float = 1.0,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> int:
    """Run every task not yet in the store; returns how many edits ran now. ``on_rows`` sees
    each batch of finished rows as the driver stores it (the edit stage times its MLflow runs).

    With GPUs, each local worker process sees its own GPU(s) (:func:`worker_gpu_plan`) and
    Ray runs one actor per worker with ``gpus_per_worker`` GPUs (Ray's ``num_gpus``), each
    holding its own model replica.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {EXECUTORS}")
    store = ResultStore(spec.out_dir)
    store.repair()
    with ExitStack() as session:
        ray_gpus = None
        if executor == "ray":  # first: the jobs are packed for the GPUs the cluster has
            ray_gpus = _ray_gpus(session.enter_context(_ray_session(ray_address, workers)),
                                 gpus_per_worker)
        per_job = facts_per_job(spec.params, spec.tasks, ray_gpus)
        pending = pending_jobs(spec.tasks, store.done_keys(), per_job)
        n_pending = sum(len(t) for t in pending.values())
        skipped = len(spec.tasks) - n_pending
        if skipped:
            log.info("resuming: %d of %d edits already done", skipped, len(spec.tasks))
        bar = session.enter_context(tqdm(
            total=n_pending, desc="edits", unit="edit", disable=not progress or n_pending == 0
        ))

        def record(rows: list[dict]) -> None:
            store.append(rows)
            bar.update(len(rows))
            if on_rows is not None:
                on_rows(rows)

        if executor == "local" and workers <= 1:
            for (_, fact_ids), tasks in pending.items():
                _run_job(spec, fact_ids, tasks, on_row=lambda row: record([row]))
        elif executor == "local":
            _run_pool(spec, pending, workers, gpus_per_worker, record)
        else:
            _run_ray(spec, pending, record, ray_gpus, gpus_per_worker, workers)
    return n_pending


def _run_pool(
    spec: SweepSpec, pending: dict[JobKey, list[EditTask]], workers: int, gpus_per_worker: float,
    record: Callable[[list[dict]], None],
) -> None:
    """The jobs in ``workers`` local processes. Each worker puts every row on a queue as it
    finishes, and the driver stores them as they come: a killed or failed run keeps every
    finished row, not only those of finished jobs (a job may hold several facts' edits)."""
    context = get_context("spawn")
    gpus, rows = context.Queue(), context.Queue()
    for visible in worker_gpu_plan(spec.params, workers, gpus_per_worker):
        gpus.put(visible)
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context,
        initializer=_init_worker, initargs=(gpus, os.getpid(), rows),
    )
    try:
        running = {pool.submit(_run_pool_job, spec, f, t) for (_, f), t in pending.items()}

        def finished() -> tuple[list[int], bool]:
            done = {future for future in running if future.done()}
            running.difference_update(done)
            return [future.result() for future in done], not running  # raises a worker's error

        _stream(finished, lambda wait: _taken(rows, wait), record)
    except BaseException:
        _keep(lambda: _taken(rows, 0), record)  # what the workers had finished
        _stop_pool(pool)  # Ctrl-C or a failure: not after every queued job
        raise
    pool.shutdown()


def _stream(
    finished: Callable[[], tuple[list[int], bool]], take: Callable[[float], list[dict]],
    record: Callable[[list[dict]], None],
) -> None:
    """Store the workers' rows as they arrive until every job has finished and its rows are in:
    ``finished()`` gives the row counts of the jobs finished since it was last asked and
    whether all have; ``take(wait)`` the rows waiting (up to ``wait`` seconds for the first)."""
    sent = received = 0
    deadline = math.inf
    while True:
        counts, done = finished()
        sent += sum(counts)
        rows = take(0.2)
        if rows:
            record(rows)
            received += len(rows)
        if done and received >= sent:
            return
        if done and deadline == math.inf:
            deadline = time.monotonic() + ROW_STRAGGLERS_S
        elif time.monotonic() > deadline:
            log.warning("%d rows sent by the workers never arrived", sent - received)
            return


#: Seconds the driver waits, once every job has returned, for rows still in the queue.
ROW_STRAGGLERS_S = 60.0
#: A local worker's row queue (set by :func:`_init_worker`; None in the driver).
_ROWS = None


def _streamed_job(
    spec: SweepSpec, fact_ids: Sequence[str], tasks: list[EditTask], put: Callable[[dict], None]
) -> int:
    """A job whose rows each go to ``put`` (the driver's queue) as they finish; returns how
    many, for the driver's accounting."""
    sent = 0

    def each(row: dict) -> None:
        nonlocal sent
        put(row)
        sent += 1

    _run_job(spec, fact_ids, tasks, on_row=each)
    return sent


def _run_pool_job(spec: SweepSpec, fact_ids: Sequence[str], tasks: list[EditTask]) -> int:
    """A local worker's job (:func:`_streamed_job` onto the queue :func:`_init_worker` kept)."""
    return _streamed_job(spec, fact_ids, tasks, _ROWS.put)


def _keep(take: Callable[[], list[dict]], record: Callable[[list[dict]], None]) -> None:
    """Store the rows still waiting when the run stops (Ctrl-C, a failed job)."""
    rows = take()
    if rows:
        record(rows)


def _taken(rows, wait: float) -> list[dict]:
    """The rows waiting in a local queue (waiting up to ``wait`` seconds for the first)."""
    batch = []
    try:
        batch.append(rows.get(timeout=wait) if wait else rows.get_nowait())
        while True:
            batch.append(rows.get_nowait())
    except Empty:
        pass
    return batch


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued jobs and end the workers now (the executor's own shutdown would wait
    for every running job); rows already recorded are kept."""
    processes = list(getattr(pool, "_processes", {}).values())  # no public handle in 3.11
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def worker_gpu_plan(params: Mapping, workers: int, gpus_per_worker: float = 1.0) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each local worker: the visible GPUs spread over the workers
    when ``model.device`` is ``auto`` or ``cuda`` (an explicit ``cuda:N`` or ``cpu`` keeps
    every worker where it says)."""
    setting = str((params.get("model") or {}).get("device", "auto")).lower()
    if setting not in ("auto", "cuda"):
        return [None] * workers
    return assign_gpus(workers, visible_gpus(), gpus_per_worker)


def _init_worker(queue, parent: int, rows=None) -> None:
    """Worker initializer: exit with the driver, keep the queue rows go to, then take this
    process's GPU(s) before CUDA is initialised."""
    global _ROWS
    exit_with_parent(parent)
    _ROWS = rows
    visible = queue.get()
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible


#: Seconds between two checks that a worker's driver still lives (where no signal tells it).
PARENT_POLL_S = 1.0


def exit_with_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    """End this process when ``parent`` dies (``kill -9`` of the driver): a pool worker must not
    go on holding a model replica and a GPU. Linux's parent-death signal acts at once; a daemon
    thread that polls the parent pid covers macOS (and a race with the prctl call)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the poll below still ends the worker

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)  # no cleanup to do: the driver alone writes rows

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


#: prctl option of the parent-death signal (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


class _FactWorker:
    """A Ray actor: one model replica on its own GPU(s), running jobs in turn."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec

    def run(self, fact_ids: tuple[str, ...], tasks: list[EditTask], rows) -> int:
        return _run_ray_job(self.spec, fact_ids, tasks, rows)


def _run_ray_job(spec: SweepSpec, fact_ids: Sequence[str], tasks: list[EditTask], rows) -> int:
    """A Ray job (:func:`_streamed_job` onto the driver's Ray queue ``rows``)."""
    return _streamed_job(spec, fact_ids, tasks, rows.put)


@contextmanager
def _ray_session(address: str | None, workers: int) -> Iterator[Any]:
    """Ray, connected to ``address`` or started here with ``workers`` CPUs (and shut down
    after, only if started here)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else max(workers, 1),
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _run_ray(
    spec: SweepSpec, pending, record, gpus: float, gpus_per_worker: float = 1.0, workers: int = 1,
) -> None:
    """The jobs as Ray tasks, or on one actor per worker when the workers take ``gpus`` > 0
    (:func:`_ray_gpus`); each row comes back through a Ray queue as it finishes, as from
    local workers. Ray is connected (:func:`_ray_session`)."""
    import ray
    from ray.util.queue import Empty as RayEmpty
    from ray.util.queue import Queue as RayQueue

    spec_ref = ray.put(spec)
    rows = RayQueue()

    def take(wait: float) -> list[dict]:
        try:
            first = [rows.get(timeout=wait)] if wait else [rows.get_nowait()]
        except RayEmpty:
            return []
        return first + rows.get_nowait_batch(rows.qsize())

    jobs = [(fact_ids, tasks) for (_, fact_ids), tasks in pending.items()]
    try:
        if gpus > 0:
            # One actor (model replica) per worker on its own GPU(s); Ray sets their
            # CUDA_VISIBLE_DEVICES, so model.device=auto finds the GPU it was given.
            from ray.util import ActorPool

            actor = ray.remote(num_cpus=spec.threads or 1, num_gpus=gpus_per_worker)(_FactWorker)
            n_actors = max(1, min(workers, int(gpus / gpus_per_worker)))
            pool = ActorPool([actor.remote(spec_ref) for _ in range(n_actors)])
            for job in jobs:
                pool.submit(lambda a, job: a.run.remote(*job, rows), job)

            def finished() -> tuple[list[int], bool]:
                counts = []
                while pool.has_next():
                    try:
                        counts.append(pool.get_next_unordered(timeout=0))
                    except TimeoutError:
                        break
                return counts, not pool.has_next()
        else:
            remote = ray.remote(num_cpus=spec.threads or 1)(_run_ray_job)
            refs = [remote.remote(spec_ref, fact_ids, tasks, rows) for fact_ids, tasks in jobs]

            def finished() -> tuple[list[int], bool]:
                nonlocal refs
                if not refs:
                    return [], True
                ready, refs = ray.wait(refs, num_returns=len(refs), timeout=0)
                return ray.get(ready), not refs

        _stream(finished, take, record)
    except BaseException:
        _keep(lambda: take(0), record)  # what the jobs had finished
        raise
