"""One Optuna study per (method, problem): maximise the mean overall score of the tuning facts
subject to mean rewrite score <= ``max_rewrite`` (paper App. A), resumable from RDB storage.

The pieces: :mod:`~locedit.tuning.storage` (name, storage, sampler, pruner),
:mod:`~locedit.tuning.trials` (the objective and the trial loop),
:mod:`~locedit.tuning.selection` (the choice and its fallback), :mod:`~locedit.tuning.outputs`
(files and MLflow). :func:`run_study` puts them together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from locedit.tuning.objective import TuneTarget
from locedit.tuning.outputs import log_study, write_outputs
from locedit.tuning.selection import Selection, select_trial, trial_summaries
from locedit.tuning.space import SearchSpace, TuneConfig
from locedit.tuning.storage import open_storage, open_study, safe_url
from locedit.tuning.tracking import study_run
from locedit.tuning.trials import is_complete, make_objective, optimise

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    """A finished (or resumed-and-finished) study: its identity, trials and choice."""

    study_name: str
    storage: str
    space: SearchSpace
    layer: int
    n_facts: int
    selection: Selection
    trials: list[dict[str, Any]]
    ran_now: int
    complete: bool
    plots: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_name": self.study_name,
            "storage": self.storage,
            "method": self.space.method,
            "problem": self.space.problem,
            "layer": self.layer,
            "n_facts": self.n_facts,
            "space": self.space.to_dict(),
            "selection": self.selection.to_dict(),
            "trials": self.trials,
            "ran_now": self.ran_now,
            "complete": self.complete,
            "plots": self.plots,
            "mlflow_run_id": self.mlflow_run_id,
        }


def run_study(
    target: TuneTarget,
    space: SearchSpace,
    config: TuneConfig,
    name: str,
    out_dir: Path | None = None,
    mlflow_cfg: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run (or resume) the study ``name`` until its grid is covered or it has ``n_trials``
    finished trials, then choose its hyperparameters and save its figures and summary."""
    storage = open_storage(config.storage, config)
    study = open_study(name, storage, space, config)
    if study.trials:
        log.info(
            "study %s: resuming with %d trials in %s",
            name,
            len(study.trials),
            safe_url(config.storage),
        )
    study.set_user_attr("space", space.to_dict())
    study.set_user_attr("max_rewrite", config.max_rewrite)
    logged = {
        "method": space.method,
        "problem": space.problem,
        "mode": space.mode,
        "layer": target.layer,
        "n_facts": len(target.records),
        "study_name": name,
        "storage": safe_url(config.storage),
        "max_rewrite": config.max_rewrite,
        "objective": config.objective,
        "space": space.to_dict(),
        "base_hparams": target.base_hparams.to_dict(),
    }
    use_mlflow = mlflow_cfg is not None
    with (
        study_run(study, logged, mlflow_cfg, parent_run_id) if use_mlflow else nullcontext() as run
    ):
        run_id = run.info.run_id if run is not None else None
        objective = make_objective(target, space, config, run_id, progress)
        ran = optimise(study, objective, space, config, progress)
        selection = select_trial(study, config.max_rewrite, config.fallback)
        (log.info if selection.feasible else log.warning)("%s", selection.message)
        result = StudyResult(
            study_name=name,
            storage=safe_url(config.storage),
            space=space,
            layer=target.layer,
            n_facts=len(target.records),
            selection=selection,
            trials=trial_summaries(study),
            ran_now=ran,
            complete=is_complete(study, space, config),
            mlflow_run_id=run_id,
        )
        if out_dir is not None:
            write_outputs(study, result, space, config, out_dir)
        if run is not None:
            log_study(study, result, out_dir)
    return result
