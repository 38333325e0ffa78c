"""Optuna studies per (method, problem): the KL weight of ROME/MEMIT and the L-infinity radius of
constrained finetuning, chosen on the first tuning facts at one layer so that the mean overall
score is highest while the mean rewrite score stays <= 0.99 (paper App. A).

    space = search_space("rome", "error_injection", config)        # the paper's grid or TPE ranges
    result = run_study(target, space, config, name)                # resumes from RDB storage
    result.selection.params                                         # {"kl_factor": 0.9}
"""

from locedit.tuning.objective import SCORES, TrialScores, TuneTarget, evaluate
from locedit.tuning.selection import CONSTRAINT, Selection, is_feasible, select_trial
from locedit.tuning.space import (
    PAPER_HPARAM_GRIDS,
    STEP_FIELDS,
    TUNED_FIELDS,
    SearchSpace,
    TuneConfig,
    search_space,
)
from locedit.tuning.storage import open_storage, safe_url, study_name
from locedit.tuning.study import StudyResult, run_study
from locedit.tuning.trials import NoScores, pending_grid_points

__all__ = [
    "CONSTRAINT",
    "PAPER_HPARAM_GRIDS",
    "SCORES",
    "STEP_FIELDS",
    "TUNED_FIELDS",
    "NoScores",
    "SearchSpace",
    "Selection",
    "StudyResult",
    "TrialScores",
    "TuneConfig",
    "TuneTarget",
    "evaluate",
    "is_feasible",
    "open_storage",
    "pending_grid_points",
    "run_study",
    "safe_url",
    "search_space",
    "select_trial",
    "study_name",
]
