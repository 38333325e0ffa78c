"""What each stage invocation cost: wall time and peak memory, kept in ``<outputs>/costs.json``.

Issue 29 asks how every stage's cost grows with the number of facts. A stage that is cut off
and resumed runs in several invocations; each is appended (with how it ended), so the cost of
a stage is the sum of its invocations' seconds and the largest of their peaks, and a resumed
run says so instead of reporting only its last piece.

Peak memory is recorded two ways. ``peak_tree_pss_mib``: the largest total proportional set
size of the stage's process and all its descendants (the edit sweep's workers load their own
copy of the model), sampled once a second by :class:`TreeMemory`; PSS divides shared pages
among the processes that share them, so the sum is what the run takes from the machine.
``peak_rss_mib`` / ``peak_rss_child_mib`` come from ``getrusage``: the stage's process, and its
largest finished child (a forked helper counts the pages it shared with the stage at the fork).
"""

from __future__ import annotations

import json
import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from locedit.storage import atomic_write_text

COSTS_FILE = "costs.json"


def peak_rss_mib() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident memory in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(own, 1), round(children, 1)


class TreeMemory:
    """Peak summed PSS (MiB) of this process and its descendants, sampled in a daemon thread
    every ``interval`` seconds while the context is open (peaks between samples are missed)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_mib = 0.0
        self._tick: tuple[float, Callable[[], object]] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tree-memory", daemon=True)

    def on_tick(self, every: float, call: Callable[[], object]) -> None:
        """Also run ``call`` every ``every`` seconds from the sampling thread."""
        self._tick = (every, call)

    def sample(self) -> float:
        import psutil

        root = psutil.Process()
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.Error, AttributeError):  # gone, or no PSS on this platform
                continue
        mib = total / 2**20
        self.peak_mib = max(self.peak_mib, mib)
        return mib

    def _watch(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            self.sample()
            if self._tick is not None and time.perf_counter() - last >= self._tick[0]:
                last = time.perf_counter()
                self._tick[1]()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def read_costs(outputs: Path) -> dict[str, list[dict[str, Any]]]:
    """Stage name -> its recorded invocations, oldest first ({} when none are recorded)."""
    path = Path(outputs) / COSTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_cost(outputs: Path, stage: str, entry: dict[str, Any], index: int | None = None) -> int:
    """Append ``entry`` to the stage's invocations, or replace invocation ``index``; returns
    its index. Read, change and write hold ``costs.json.lock``: two stages measured at once
    in one outputs folder (``locedit tune`` beside ``locedit run edit``, each with its
    heartbeat) would otherwise each write the file it read and lose the other's entry."""
    Path(outputs).mkdir(parents=True, exist_ok=True)
    path = Path(outputs) / COSTS_FILE
    with FileLock(f"{path}.lock"):
        costs = read_costs(outputs)
        entries = costs.setdefault(stage, [])
        if index is None or index >= len(entries):
            entries.append(entry)
            index = len(entries) - 1
        else:
            entries[index] = entry
        atomic_write_text(path, json.dumps(costs, indent=2) + "\n")
    return index


#: Seconds between the updates of a running invocation's entry: a stage killed outright
#: (SIGKILL, a lost machine) keeps its cost up to the last update.
HEARTBEAT = 30.0


@contextmanager
def measured(outputs: Path, stage: str, heartbeat: float = HEARTBEAT) -> Iterator[None]:
    """Record the body's wall time and peak memory as one invocation of ``stage``, also when it
    raises or is interrupted (``status`` says which), so a resumed stage's cost is complete.
    The entry is written at the start as ``running`` and updated every ``heartbeat`` seconds,
    so even a kill that runs no cleanup leaves the cost up to its last update."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    clock = time.perf_counter()
    memory = TreeMemory()

    def entry(status: str) -> dict[str, Any]:
        own, child = peak_rss_mib()
        return {
            "status": status,
            "started": started,
            "seconds": round(time.perf_counter() - clock, 2),
            "peak_tree_pss_mib": round(memory.peak_mib, 1),
            "peak_rss_mib": own,
            "peak_rss_child_mib": child,
        }

    index = record_cost(outputs, stage, entry("running"))
    memory.on_tick(heartbeat, lambda: record_cost(outputs, stage, entry("running"), index))
    status = "interrupted"
    try:
        with memory:
            yield
        status = "ok"
    except KeyboardInterrupt:
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        record_cost(outputs, stage, entry(status), index)


def current_run(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The invocations of the stage's latest run: those after the previous successful one
    (``dvc repro`` keeps the file across runs, so older runs' pieces stay in it)."""
    ok = [i for i, entry in enumerate(entries) if entry.get("status") == "ok"]
    if ok and ok[-1] == len(entries) - 1:
        ok.pop()
    return entries[ok[-1] + 1:] if ok else list(entries)


def stage_total(entries: list[dict[str, Any]], latest_run: bool = True) -> dict[str, Any]:
    """One stage's cost over the invocations of its latest run (:func:`current_run`), or over
    every recorded invocation (``latest_run=False``: a folder that holds one run, resumed
    pieces and cached reruns included): summed seconds, largest peaks, how many pieces and
    each piece's seconds."""
    entries = current_run(entries) if latest_run else list(entries)
    first_ok = next((i for i, e in enumerate(entries) if e.get("status") == "ok"), len(entries))
    return {
        "pieces": [float(e.get("seconds", 0.0)) for e in entries],
        # the work until the stage first finished; later pieces reran it (a resumed pipeline
        # runs every stage again, the finished ones from their caches)
        "to_completion": sum(float(e.get("seconds", 0.0)) for e in entries[: first_ok + 1]),
        "pieces_to_completion": min(first_ok + 1, len(entries)),
        "seconds": sum(float(e.get("seconds", 0.0)) for e in entries),
        "peak_rss_mib": max((float(e.get("peak_rss_mib", 0.0)) for e in entries), default=0.0),
        "peak_rss_child_mib": max(
            (float(e.get("peak_rss_child_mib", 0.0)) for e in entries), default=0.0
        ),
        "peak_tree_pss_mib": max(
            (float(e.get("peak_tree_pss_mib", 0.0)) for e in entries), default=0.0
        ),
    }
