"""What a sweep edits: facts x layers x methods x problems, with hyperparameters per pair.

The layers come from :func:`locedit.editing.layers.sweep_layers` (the one layer-grid function).
"""

from __future__ import annotations

import hashlib
import json
import random
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

#: Where every edit row starts: the worker, whose imports reach the editor, the method
#: registry, the metrics, the problems and the hooks (followed by :func:`shared_code_version`).
ROW_MODULES: tuple[str, ...] = ("locedit.sweep.worker", "locedit.editing.methods", *EVALUATION_MODULES)


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
    #: the facts edited together with this one in the same update (``batch_size`` > 1)
    co_facts: tuple[str, ...] = ()

    @property
    def seed_key(self) -> str:
        return f"{self.fact_id}|{self.layer}|{self.method}|{self.problem}|{self.hparams_id}"

    @property
    def key(self) -> str:
        key = f"{self.seed_key}|{self.content}" if self.content else self.seed_key
        return f"{key}|co:{'+'.join(self.co_facts)}" if self.co_facts else key


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


def shared_code_version() -> str:
    """Code version of the path every edit row takes (:data:`ROW_MODULES` and, through their
    imports, the editor, the registry, the metrics, the problems, the hooks), without the
    methods' own modules: the registry names them all, but a row runs only its own."""
    own = {module for method in REGISTRY.values() for module in method.code_modules}
    return code_version(*ROW_MODULES, exclude=sorted(own))


def method_code_version(method: str) -> str:
    """Code version of what computes a ``method`` row: the shared path
    (:func:`shared_code_version`) and the method's own module from the registry with its
    imports (the whole ``locedit.editing`` package for a name it does not know). A change to
    finetuning reruns FT rows, not ROME's; one to the editor or the worker reruns every row."""
    own = REGISTRY[method].code_modules if method in REGISTRY else ("locedit.editing",)
    # The shared part versions the row modules; not following them here keeps the registry
    # (reached through grouped.py's editor) from pulling every other method's module in.
    return f"{shared_code_version()}+{code_version(*own, exclude=ROW_MODULES)}"


def edit_content_id(
    fact: FactRecord | str, method: str, problem: str, context: str,
    co_facts: Sequence[FactRecord | str] = (),
) -> str:
    """The row's content key; co-edited facts' contents enter it only when there are any, so a
    single edit keys as before."""
    record = fact_content(fact)
    if co_facts:
        record = [record, [fact_content(co) for co in co_facts]]
    return content_key(
        "edit", model=None, record=record, params=[problem, context],
        code=method_code_version(method), length=12,
    )


def _fact_id(fact: FactRecord | str) -> str:
    return fact.fact_id if isinstance(fact, FactRecord) else str(fact)


def co_edit_candidate(fact: FactRecord | str, problem: str) -> bool:
    """Whether ``fact`` can be co-edited under ``problem`` by its record alone: Error Injection
    needs an o_false, Fact Erasure the filter's ``erasure_ok`` (o_noise and the noise of
    Tracing Reversal and Fact Forcing come from the model, at edit time). Bare ids count."""
    if not isinstance(fact, FactRecord):
        return True
    spec = get_problem(problem)
    if spec.needs_erasure_ok and not fact.extra.get("erasure_ok", False):
        return False
    return spec.target != "o_false" or bool(fact.target_new)


def draw_co_facts(pool: Sequence[str], focal: str, n: int, seed: int) -> tuple[str, ...]:
    """``n`` fact ids of ``pool`` to edit together with ``focal``, never ``focal`` itself.

    Seeded by (``seed``, ``focal``) alone and drawn from the sorted pool, so a fact's
    co-edits do not depend on the order facts are listed or processed in; the first n of a
    seeded permutation, so a larger batch keeps a smaller one's co-edits.
    """
    if n <= 0:
        return ()
    candidates = sorted(set(pool) - {focal})
    if len(candidates) < n:
        raise ValueError(
            f"batch_size {n + 1} needs {n} co-edited facts besides {focal!r}, "
            f"only {len(candidates)} are available"
        )
    digest = hashlib.sha256(f"co-edit|{seed}|{focal}".encode()).digest()
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(candidates)
    return tuple(candidates[:n])


def co_facts_for(
    fact: FactRecord | str, facts: Sequence[FactRecord | str], problem: str, hparams: Any
) -> tuple[str, ...]:
    """The facts co-edited with ``fact`` (``hparams.batch_size - 1`` of them, none for methods
    without a batch): drawn from ``facts`` (the run's list) among the problem's candidates."""
    n = int(getattr(hparams, "batch_size", 1)) - 1
    if n <= 0:
        return ()
    pool = [_fact_id(f) for f in facts if co_edit_candidate(f, problem)]
    return draw_co_facts(pool, _fact_id(fact), n, int(hparams.seed))


def plan_tasks(
    facts: Sequence[FactRecord | str], layers: Sequence[int], hparams: Mapping[tuple[str, str], Any],
    context: str,
) -> list[EditTask]:
    """Every task, fact-major so a worker can reuse a fact's pre-edit probabilities.

    ``context`` carries the model fingerprint and evaluation settings; give records (not only
    ids) so that a changed record is re-edited. With a ``batch_size`` above 1 each task names
    its co-edited facts (:func:`co_facts_for`), drawn from ``facts``.
    """
    ids = {pair: content_id([asdict(h), context]) for pair, h in hparams.items()}
    by_id = {_fact_id(f): f for f in facts}
    tasks = []
    for fact in facts:
        fact_id = _fact_id(fact)
        for (method, problem), h in hparams.items():
            co = co_facts_for(fact, facts, problem, h)
            cid = edit_content_id(fact, method, problem, context, [by_id[c] for c in co])
            tasks.extend(
                EditTask(fact_id, layer, method, problem, ids[(method, problem)], cid, co)
                for layer in layers
            )
    return tasks
