"""What a sweep edits: facts x layers x methods x problems, with hyperparameters per pair.

The layers come from :func:`locedit.editing.layers.sweep_layers` (the one layer-grid function).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from locedit.data.records import FactRecord
from locedit.editing import hparams_for
from locedit.editing.methods import REGISTRY
from locedit.problems import get_problem
from locedit.versioning import code_version, content_key

#: The modules that score an edit and build its target (every method shares them).
EVALUATION_MODULES: tuple[str, ...] = ("locedit.metrics.evaluation", "locedit.problems")


@dataclass(frozen=True)
class EditTask:
    """One cell of the sweep; ``key`` identifies its result row for resuming.

    ``hparams_id`` covers the hyperparameters and evaluation context (it also seeds the edit);
    ``content`` the fact's content and the code version of the method and the metrics, so
    a code change or an edited record reruns exactly the rows it affects.
    """

    fact_id: str
    layer: int
    method: str
    problem: str
    hparams_id: str
    content: str = ""

    @property
    def seed_key(self) -> str:
        return f"{self.fact_id}|{self.layer}|{self.method}|{self.problem}|{self.hparams_id}"

    @property
    def key(self) -> str:
        return f"{self.seed_key}|{self.content}" if self.content else self.seed_key


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


def fact_content(fact: FactRecord | str) -> Any:
    """What a fact's edit rows depend on: every field, ``extra`` too (the filter's
    ``erasure_ok`` decides whether Fact Erasure applies)."""
    if isinstance(fact, FactRecord):
        return asdict(fact)
    return str(fact)


def method_code_version(method: str) -> str:
    """Code version of what computes a ``method`` row: the method's module (from the registry;
    the whole ``locedit.editing`` package for a name it does not know), the metrics."""
    module = REGISTRY[method].code_module if method in REGISTRY else "locedit.editing"
    return code_version(module, *EVALUATION_MODULES)


def edit_content_id(fact: FactRecord | str, method: str, problem: str, context: str) -> str:
    return content_key(
        "edit", model=None, record=fact_content(fact), params=[problem, context],
        code=method_code_version(method), length=12,
    )


def plan_tasks(
    facts: Sequence[FactRecord | str], layers: Sequence[int], hparams: Mapping[tuple[str, str], Any],
    context: str,
) -> list[EditTask]:
    """Every task, fact-major so a worker can reuse a fact's pre-edit probabilities.

    ``context`` carries the model fingerprint and evaluation settings; give records (not only
    ids) so that a changed record is re-edited.
    """
    ids = {pair: content_id([asdict(h), context]) for pair, h in hparams.items()}
    tasks = []
    for fact in facts:
        fact_id = fact.fact_id if isinstance(fact, FactRecord) else str(fact)
        for method, problem in hparams:
            cid = edit_content_id(fact, method, problem, context)
            tasks.extend(
                EditTask(fact_id, layer, method, problem, ids[(method, problem)], cid) for layer in layers
            )
    return tasks
