"""What a finished study leaves behind: its summary JSON, trials CSV and figures under
``out_dir/<method>-<problem>/``, and its choice logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from locedit.tuning import plots
from locedit.tuning.space import SearchSpace, TuneConfig


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_outputs(
    study: optuna.Study, result, space: SearchSpace, config: TuneConfig, out_dir: Path
) -> None:
    """The study's summary JSON, trials CSV and figures under ``out_dir/<slug>/``."""
    folder = Path(out_dir) / _slug(f"{space.method}-{space.problem}")
    folder.mkdir(parents=True, exist_ok=True)
    study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
    if config.plots:
        import matplotlib

        matplotlib.use("Agg")
        chosen = (result.selection.params or {}).get(space.field)
        made = [
            plots.history_plot(study, folder / "optimization_history.png"),
            plots.importance_plot(study, folder / "param_importances.png"),
            plots.tuning_curve(
                study, folder / "tuning_curve.png", space.field, config.max_rewrite, chosen
            ),
        ]
        result.plots = [str(p) for p in made if p is not None]
    (folder / "study.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")


def log_study(study: optuna.Study, result, out_dir: Path | None) -> None:
    import mlflow

    from locedit.tracking import log_metrics

    states = [t.state.name for t in study.trials]
    metrics = {
        f"trials_{s.lower()}": float(states.count(s)) for s in ("COMPLETE", "PRUNED", "FAIL")
    }
    metrics["feasible"] = float(result.selection.feasible)
    metrics.update({f"chosen_{k}": v for k, v in result.selection.values.items()})
    for key, value in (result.selection.params or {}).items():
        metrics[f"chosen_{key}"] = float(value)
    log_metrics(metrics)
    mlflow.set_tags(
        {
            "selection.rule": result.selection.rule,
            "selection.feasible": str(result.selection.feasible),
        }
    )
    if out_dir is not None:
        folder = Path(out_dir) / _slug(f"{result.space.method}-{result.space.problem}")
        if folder.exists():
            mlflow.log_artifacts(str(folder), artifact_path="study")
