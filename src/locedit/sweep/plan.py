"""What a sweep edits: facts x layers x methods x problems, with hyperparameters per pair.

The layers come from :func:`locedit.editing.layers.sweep_layers` (the one layer-grid function).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from locedit.editing import hparams_for
from locedit.problems import get_problem


@dataclass(frozen=True)
class EditTask:
    """One cell of the sweep; ``key`` identifies its result row for resuming."""

    fact_id: str
    layer: int
    method: str
    problem: str
    hparams_id: str

    @property
    def key(self) -> str:
        return f"{self.fact_id}|{self.layer}|{self.method}|{self.problem}|{self.hparams_id}"


def content_id(value: Any) -> str:
    """Short stable hash of JSON-able content (hyperparameters, evaluation context)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolved_hparams(
    params: Mapping[str, Any], methods: Sequence[str], problems: Sequence[str],
    tuned: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> dict[tuple[str, str], Any]:
    """Hyperparameters per (method, problem): conf defaults < problem overrides < tuned values."""
    out = {}
    for problem in problems:
        get_problem(problem)
        for method in methods:
            overrides = ((tuned or {}).get(problem) or {}).get(method) or {}
            out[(method, problem)] = hparams_for(method, params, problem=problem, overrides=overrides)
    return out


def plan_tasks(
    fact_ids: Sequence[str], layers: Sequence[int], hparams: Mapping[tuple[str, str], Any],
    context: str,
) -> list[EditTask]:
    """Every task, fact-major so a worker can reuse a fact's pre-edit probabilities."""
    ids = {pair: content_id([asdict(h), context]) for pair, h in hparams.items()}
    return [
        EditTask(fact_id, layer, method, problem, ids[(method, problem)])
        for fact_id in fact_ids
        for (method, problem) in hparams
        for layer in layers
    ]
