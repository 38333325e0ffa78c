"""What every stage needs: the composed params, output paths and the model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from locedit.params import (
    DTYPES,
    apply_overrides,
    check_params,
    compose_params,
    load_params,
    model_from_params,
    parse_override,
    to_container,
)
from locedit.storage import atomic_write_text

__all__ = [
    "DTYPES",
    "apply_overrides",
    "check_params",
    "compose_params",
    "load_params",
    "mark_reports_stale",
    "model_from_params",
    "output_dir",
    "parse_override",
    "to_container",
]


def output_dir(params: DictConfig, stage: str) -> Path:
    path = Path(params.paths.outputs) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


#: The first line of a stale summary.md / tables.md, and the marker file beside them.
STALE_BANNER = "> **STALE:**"
STALE_FILE = "STALE.md"


def reports_dir(params: DictConfig) -> Path:
    return Path(params.paths.get("reports", "reports"))


def mark_reports_stale(params: DictConfig, stage: str) -> None:
    """Stamp the reports stale as ``stage`` starts: every stage feeds analyze, so until analyze
    finishes the reports describe an earlier run. summary.md and tables.md get a banner,
    metrics.json keeps its numbers only under ``previous`` beside a ``stale`` reason (so
    ``dvc metrics show`` does not show them as current), the ``dvc plots`` CSVs are removed and
    STALE.md is written in reports/, tables/ and figures/. Analyze rewrites them all."""
    reports = reports_dir(params)
    if not reports.is_dir():
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    reason = (
        f"the {stage} stage started at {started}: these reports are from an earlier run "
        "until the analyze stage finishes (`dvc repro`, or `locedit run analyze`)"
    )
    metrics = reports / "metrics.json"
    if metrics.exists():
        try:
            old = json.loads(metrics.read_text())
        except (OSError, ValueError):
            old = {}
        previous = old.get("previous", {}) if isinstance(old, dict) and "stale" in old else old
        atomic_write_text(metrics, json.dumps({"stale": reason, "previous": previous}, indent=2) + "\n")
    for name in ("summary.md", "tables.md"):
        path = reports / name
        if path.exists():
            text = path.read_text()
            if text.startswith(STALE_BANNER):
                text = text.partition("\n\n")[2]
            atomic_write_text(path, f"{STALE_BANNER} {reason}\n\n{text}")
    for plot in (reports / "plots").glob("*.csv"):
        plot.unlink(missing_ok=True)
    for folder in (reports, reports / "tables", reports / "figures"):
        if folder.is_dir():
            atomic_write_text(folder / STALE_FILE, f"{STALE_BANNER} {reason}\n")


def reports_current(params: DictConfig) -> None:
    """Analyze finished: the reports are current again (it rewrote every stamped file)."""
    (reports_dir(params) / STALE_FILE).unlink(missing_ok=True)
