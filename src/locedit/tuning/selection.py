"""Which trial a study chooses (paper App. A): the best mean overall score among trials whose
mean rewrite score stays <= ``max_rewrite``, or the documented fallback when none does.

The constraint is Optuna's own (``Trial.set_constraint``): ``Study.best_trial`` considers
feasible trials only. ``least_violation`` takes the completed trial with the lowest mean
rewrite (the most conservative edit), ``conf`` keeps the configured value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from locedit.tuning.objective import TrialScores
from locedit.tuning.space import TuneConfig

#: Name of the rewrite-ceiling constraint (feasible when <= 0).
CONSTRAINT = "mean_rewrite_minus_max"


@dataclass
class Selection:
    """The hyperparameters a study chose and why."""

    params: dict[str, Any] | None
    feasible: bool
    rule: str  # best_feasible | least_violation | conf | none
    trial: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "feasible": self.feasible,
            "rule": self.rule,
            "trial": self.trial,
            "values": {
                k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in self.values.items()
            },
            "message": self.message,
        }


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return bool(trial.constraints) and all(v <= 0.0 for v in trial.constraints.values())


def _trial_values(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    return {k: v for k, v in trial.user_attrs.items() if k.startswith("mean_")}


def select_trial(
    study: optuna.Study, max_rewrite: float, fallback: str = "least_violation"
) -> Selection:
    """The best feasible trial, or the documented fallback when none is feasible."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return Selection(
            None,
            False,
            "none",
            message=f"study {study.study_name}: no completed trial; "
            "the edit stage keeps the configured value",
        )
    if any(is_feasible(t) for t in complete):
        best = study.best_trial  # Optuna: the best among feasible trials
        return Selection(
            dict(best.params),
            True,
            "best_feasible",
            best.number,
            _trial_values(best),
            f"trial {best.number} is the best of {sum(map(is_feasible, complete))} feasible trials",
        )
    lowest = min(
        complete,
        key=lambda t: (t.user_attrs.get("mean_rewrite_score", math.inf), -t.value, t.number),
    )
    rewrite = lowest.user_attrs.get("mean_rewrite_score", math.nan)
    message = (
        f"study {study.study_name}: no trial satisfies mean rewrite <= {max_rewrite:g} "
        f"(lowest mean rewrite {rewrite:.4f}, trial {lowest.number} {lowest.params}); "
    )
    if fallback == "conf":
        return Selection(
            None, False, "conf", None, {}, message + "fallback 'conf': keeping the configured value"
        )
    return Selection(
        dict(lowest.params),
        False,
        "least_violation",
        lowest.number,
        _trial_values(lowest),
        message + "fallback 'least_violation': using that trial",
    )


def is_feasible_value(scores: TrialScores, config: TuneConfig) -> bool:
    """Whether a trial's mean rewrite score is within the ceiling (App. A: <= 0.99)."""
    return scores.mean("rewrite_score") <= config.max_rewrite


def trial_summaries(study: optuna.Study) -> list[dict[str, Any]]:
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append(
            {
                "number": t.number,
                "state": t.state.name,
                "params": dict(t.params),
                "value": t.value if t.value is None or math.isfinite(t.value) else None,
                "feasible": is_feasible(t) if t.state == TrialState.COMPLETE else None,
                "constraints": dict(t.constraints),
                **{
                    k: (None if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in _trial_values(t).items()
                },
            }
        )
    return out
