"""Append-only result rows that survive interruption, and the tidy table built from them.

Each finished edit is one whole JSON line, flushed and fsynced at once, so a killed sweep loses
at most the edit in flight; a rerun first cuts away a torn last line (:meth:`ResultStore.repair`:
a full disk or a kill mid-write), then reads the keys already present and skips those tasks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from locedit.storage import append_lines, repair_jsonl

log = logging.getLogger(__name__)


class ResultStore:
    """Rows under ``directory/rows/*.jsonl``; one file per writer process avoids contention."""

    def __init__(self, directory: Path, writer: str = "main") -> None:
        self.rows_dir = Path(directory) / "rows"
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.rows_dir / f"{writer}.jsonl"

    def rows(self) -> list[dict]:
        """Every complete row written so far (a torn last line from a kill is ignored)."""
        out = []
        for file in sorted(self.rows_dir.glob("*.jsonl")):
            for line in file.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("ignoring a torn line in %s (interrupted write)", file)
        return out

    def done_keys(self) -> set[str]:
        return {row["key"] for row in self.rows()}

    def repair(self) -> int:
        """Drop torn or invalid lines from every rows file before anything is appended; returns
        how many were dropped (their edits are not done, so the sweep reruns them)."""
        return sum(repair_jsonl(file) for file in sorted(self.rows_dir.glob("*.jsonl")))

    def append(self, rows: Iterable[dict]) -> None:
        append_lines(self.path, (json.dumps(_json_safe(row)) for row in rows))


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


#: Column order of the tidy results table (the analysis stage's input).
LEADING_COLUMNS = ["fact_id", "layer", "method", "problem", "dataset", "status", "reason"]


def results_table(rows: list[dict], keys: Iterable[str] | None = None) -> pd.DataFrame:
    """Tidy table of the rows whose key is in ``keys`` (all rows when ``None``), in task order."""
    wanted = None if keys is None else list(keys)
    by_key = {row["key"]: row for row in rows}
    ordered = [by_key[k] for k in wanted if k in by_key] if wanted is not None else list(by_key.values())
    frame = pd.DataFrame(ordered)
    if frame.empty:
        return pd.DataFrame(columns=LEADING_COLUMNS)
    rest = [c for c in frame.columns if c not in LEADING_COLUMNS]
    frame = frame[[c for c in LEADING_COLUMNS if c in frame.columns] + rest]
    return frame.reset_index(drop=True)
