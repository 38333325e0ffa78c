"""One trial's evaluation: edit each tuning fact at the tuning layer and average its scores.

The edits and metrics are exactly the sweep's (:func:`locedit.sweep.worker.run_facts`), so a
tuned value scores in the study what it later scores in the edit stage; the unedited model's
probabilities are computed once per fact and cached on disk for every later trial. With
``edit.group_size`` above 1 a trial's facts are edited in groups (issue 28), as the sweep's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.sweep.plan import EditTask, co_facts_for, content_id
from locedit.sweep.worker import EvaluationConfig, run_facts

#: The per-edit scores a trial averages (paper Sec. 3.4).
SCORES: tuple[str, ...] = (
    "rewrite_score",
    "paraphrase_score",
    "neighborhood_score",
    "overall_score",
    "essence_score",
    "overall_score_with_essence",
)


@dataclass
class TuneTarget:
    """What a study edits: the model, the tuning facts, the method, problem and layer.

    ``base_hparams`` are the conf values with the problem's overrides; a trial replaces only
    the fields it tunes. ``context`` keys the pre-edit cache (model fingerprint, evaluation
    config and problem), so a cached value is never reused for a different setting.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    covariance: Any
    records: Sequence[FactRecord]
    method: str
    problem: str
    layer: int
    base_hparams: Any
    evaluation: EvaluationConfig
    cache_dir: Path | None = None
    context: str = ""
    #: edits optimised (and each fact's measured) as one batch: ``edit.group_size``
    group_size: int = 1

    def hparams(self, overrides: dict[str, Any]) -> Any:
        return self.base_hparams.with_overrides(**overrides)

    def identity(self, tuned_fields: Sequence[str]) -> list[Any]:
        """Everything a trial's scores depend on apart from the tuned fields (for study names)."""
        fixed = {k: v for k, v in self.base_hparams.to_dict().items() if k not in set(tuned_fields)}
        return [
            self.context,
            [r.to_json() for r in self.records],
            self.method,
            self.problem,
            self.layer,
            fixed,
            asdict(self.evaluation),
        ]


@dataclass
class TrialScores:
    """A trial's edit rows and their means over the facts whose edit succeeded."""

    rows: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") == "ok"]

    def counts(self) -> dict[str, int]:
        statuses = [r.get("status") for r in self.rows]
        return {f"n_{s}": statuses.count(s) for s in ("ok", "failed", "skipped")}

    def mean(self, name: str) -> float:
        """Mean of a score over successful edits, ignoring NaN (e.g. facts without paraphrases)."""
        values = [
            float(r[name])
            for r in self.ok
            if r.get(name) is not None and not math.isnan(float(r[name]))
        ]
        return sum(values) / len(values) if values else math.nan

    def means(self) -> dict[str, float]:
        return {
            f"mean_{name}": self.mean(name) for name in SCORES if any(name in r for r in self.ok)
        }


def evaluate(
    target: TuneTarget,
    overrides: dict[str, Any],
    on_fact: Callable[[int, TrialScores], None] | None = None,
) -> TrialScores:
    """Edit every tuning fact with ``overrides`` applied and collect the sweep's rows.

    ``on_fact(i, scores)`` runs after the i-th fact (0-based): the study reports running
    means from it so a pruner can stop a hopeless trial early.
    """
    hparams = target.hparams(overrides)
    pair = (target.method, target.problem)
    hparams_id = content_id([hparams.to_dict(), target.context])
    scores = TrialScores()
    records = {r.fact_id: r for r in target.records}  # co-edits come from the tuning facts
    tasks = [
        EditTask(
            record.fact_id, target.layer, target.method, target.problem, hparams_id,
            co_facts=co_facts_for(record, target.records, target.problem, hparams),
        )
        for record in target.records
    ]
    position = {record.fact_id: i for i, record in enumerate(target.records)}

    def on_row(row: dict) -> None:  # after each fact's row, between edits: safe to prune
        scores.rows.append(row)
        if on_fact is not None:
            on_fact(position[row["fact_id"]], scores)

    run_facts(
        target.model, target.tokenizer, target.covariance, target.records, tasks,
        {pair: hparams}, target.evaluation, on_row, target.cache_dir, target.context, records,
        target.group_size,
    )
    return scores
