"""Files that survive crashes and cannot lie: whole-line appends, torn-line repair, atomic
writes, temporary-file cleanup, stale-output removal and a one-writer lock.

Low level on purpose (no ``locedit`` imports), so every stage and store can use it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Suffix of every temporary file written next to its destination before a rename.
TMP_SUFFIX = ".tmp"


def append_lines(path: Path, lines: Iterable[str]) -> None:
    """Append whole lines (each with its newline) and fsync before returning."""
    payload = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if not payload:
        return
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def repair_jsonl(path: Path) -> int:
    """Make ``path`` hold only whole, valid JSON lines; returns how many lines were dropped.

    A kill or a full disk can leave a torn last line (no newline, or half a JSON object):
    appending after it would glue the next row onto it and lose that row too. A torn tail is
    truncated away; an invalid line elsewhere makes the file be rewritten from its valid lines.
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data:
        return 0
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    valid, dropped = [], 1 if tail.strip() else 0
    for line in lines:
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            dropped += 1
            continue
        valid.append(line)
    if not dropped:
        return 0
    log.warning("%s: dropped %d torn or invalid line(s) left by an interrupted write", path, dropped)
    if len(valid) == len([line for line in lines if line.strip()]):
        with path.open("r+b") as handle:  # only the tail is torn: cut it off in place
            handle.truncate(len(data) - len(tail))
            handle.flush()
            os.fsync(handle.fileno())
    else:
        atomic_write_bytes(path, b"".join(line + b"\n" for line in valid))
    return dropped


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write(tmp_path)`` produce the file (e.g. ``frame.to_parquet``), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clean_temporary(directory: Path, min_age_s: float = 0.0) -> int:
    """Remove the ``*.tmp`` files (and ``*.tmp.*``) an interrupted run left under ``directory``.

    Call it at stage start, under the stage's lock, so no live writer's file is removed; where
    no lock guards the folder (a shared cache), ``min_age_s`` spares files written recently.
    """
    directory = Path(directory)
    if not directory.exists():
        return 0
    removed = 0
    now = time.time()
    for path in directory.rglob(f"*{TMP_SUFFIX}*"):
        if not (path.name.endswith(TMP_SUFFIX) or f"{TMP_SUFFIX}." in path.name):
            continue
        try:
            if not path.is_file() or now - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
        except OSError:
            continue
        removed += 1
    if removed:
        log.info("removed %d temporary file(s) under %s left by an interrupted run", removed, directory)
    return removed


def remove_outputs(paths: Iterable[Path]) -> None:
    """Remove a stage's summary and tables before it runs, so that an interrupted run never
    leaves the previous run's results looking current."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line that says what was kept (the CLI prints it, no traceback)."""


# -- one writer --------------------------------------------------------------------------------


class LockHeld(RuntimeError):
    """Another live process writes these outputs."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    since: float
    command: str = ""

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} (since {started})"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def _read_holder(path: Path) -> LockHolder | None:
    try:
        data = json.loads(path.read_text())
        return LockHolder(int(data["pid"]), str(data["host"]), float(data.get("since", 0)), str(data.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_stale(holder: LockHolder | None) -> bool:
    """A lock is stale when its holder is this host's dead process, or unreadable.

    A holder on another host cannot be checked: it is respected (delete the file to override).
    """
    if holder is None:
        return True
    return holder.host == socket.gethostname() and not _pid_alive(holder.pid)


@contextmanager
def output_lock(directory: Path, what: str) -> Iterator[Path]:
    """Hold ``directory/.lock`` (holder pid and host) while writing ``what``'s outputs.

    A second run raises :class:`LockHeld` with one line naming the holder; a stale lock (the
    holder died: ``kill -9``, a crash) is taken over. The file carries the holder's identity;
    an ``flock`` on it (released by the kernel when the holder dies) makes taking it atomic.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": what}
    fd = _acquire(path, what, directory)
    try:
        holder = _read_holder(path)
        if holder is not None and not _is_stale(holder):
            raise LockHeld(_held_message(what, directory, path, holder))
        if holder is not None:
            log.warning("%s: taking over the stale lock %s (%s)", what, path, holder.describe())
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _held_message(what: str, directory: Path, path: Path, holder: LockHolder | None) -> str:
    who = holder.describe() if holder else "a process that is starting"
    return f"{what}: another run writes {directory} ({who}); wait for it or stop it (if it is gone, delete {path})"


def _acquire(path: Path, what: str, directory: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive flock (the file at ``path`` now)."""
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockHeld(_held_message(what, directory, path, _read_holder(path))) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)  # the previous holder removed the file as we opened it: take the new one
    raise LockHeld(f"{what}: could not take the lock {path} (another run keeps taking it)")


# -- ids in file names -------------------------------------------------------------------------

#: An id used as its own file name: lower case (one file per id on case-insensitive disks too),
#: digits, ``_`` and ``-``, not longer than 64 and not ending like a hashed name.
_PLAIN_ID = re.compile(r"(?![-_a-z0-9]*-[0-9a-f]{12}$)[-_a-z0-9]{1,64}")


def id_filename(record_id: str, suffix: str = "", max_readable: int = 40) -> str:
    """A file name for a record id that cannot choose where it is written.

    Data files come from other people: an id with ``/``, ``..``, an absolute path, NUL or 300
    characters must never become a path. A plain id (``cf-12``) is its own name; any other
    gets a sanitised, length-limited prefix (for people) and a hash of the whole id (so ``a/b``
    and ``a_b`` never share a file). The writer keeps the id itself inside the file.
    """
    record_id = str(record_id)
    if _PLAIN_ID.fullmatch(record_id):
        return f"{record_id}{suffix}"
    readable = re.sub(r"[^-_a-z0-9]", "_", record_id[:max_readable].lower())
    digest = hashlib.sha256(record_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{readable}-{digest}{suffix}"
