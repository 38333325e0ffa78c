"""Figures of a study: Optuna's optimisation history and parameter importances, and the
tuning curve (mean scores against the tuned value, with the rewrite ceiling)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

log = logging.getLogger(__name__)


def _figure_of(axes):
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    return first.figure


def _save(axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = _figure_of(axes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def history_plot(study: optuna.Study, path: Path) -> Path | None:
    """Optuna's optimisation history (objective per trial and best so far)."""
    from optuna.visualization import matplotlib as ovm

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        log.info("study %s: no completed trial, no optimisation-history plot", study.study_name)
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _save(ovm.plot_optimization_history(study, target_name="mean overall score"), path)


def importance_plot(study: optuna.Study, path: Path) -> Path | None:
    """Optuna's parameter importances, when they are defined.

    Importance needs at least two completed trials whose parameters vary. With a single tuned
    parameter (the paper's grids) its importance is 1 by definition; the plot still records it.
    """
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    distinct = {tuple(sorted(t.params.items())) for t in complete}
    if len(complete) < 2 or len(distinct) < 2:
        log.info(
            "study %s: parameter importance needs >= 2 completed trials with different "
            "parameters (%d completed); no importance plot",
            study.study_name,
            len(complete),
        )
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # PED-ANOVA warns that importances are equal on grids of a few trials; expected here
            warnings.filterwarnings("ignore", message="Target and region quantiles")
            return _save(ovm.plot_param_importances(study), path)
    except (RuntimeError, ValueError, ZeroDivisionError) as err:
        log.info("study %s: no importance plot (%s)", study.study_name, err)
        return None


def tuning_curve(
    study: optuna.Study,
    path: Path,
    field: str,
    max_rewrite: float,
    chosen: float | None,
) -> Path | None:
    """Mean rewrite, paraphrase, neighbourhood and overall score against the tuned value."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if field in t.params and "mean_rewrite_score" in t.user_attrs
    ]
    if not trials:
        return None
    trials.sort(key=lambda t: t.params[field])
    xs = [t.params[field] for t in trials]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (
        ("rewrite", "o-"),
        ("paraphrase", "s--"),
        ("neighborhood", "^--"),
        ("overall", "D-"),
    ):
        ys = [t.user_attrs.get(f"mean_{name}_score", math.nan) for t in trials]
        ax.plot(xs, ys, style, label=name)
    ax.axhline(max_rewrite, color="grey", linestyle=":", label=f"max rewrite {max_rewrite:g}")
    if chosen is not None:
        ax.axvline(chosen, color="black", linewidth=1, label=f"chosen {chosen:g}")
    if min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(field)
    ax.set_ylabel("mean score")
    ax.set_title(study.study_name, fontsize=7)
    ax.legend(fontsize=7)
    return _save(ax, path)
