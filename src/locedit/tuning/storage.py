"""Where a study lives: its name (readable, and distinct whenever anything that changes a
trial's scores changes), its RDB storage with heartbeats, and its sampler and pruner."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.engine import make_url

from locedit.sweep.plan import content_id
from locedit.tuning.space import SearchSpace, TuneConfig


def study_name(
    model: str,
    method: str,
    problem: str,
    data_slice: str,
    layer: int,
    mode: str,
    identity: Any,
) -> str:
    """``model/method/problem/data slice/layer/mode/digest``: readable, and distinct whenever
    anything that changes a trial's scores changes (the digest covers the rest)."""
    tag = Path(str(model)).name or str(model)
    return f"{tag}/{method}/{problem}/{data_slice}/L{layer}/{mode}/{content_id(identity)}"


def safe_url(url: str) -> str:
    """The storage URL with any password hidden (for logs, JSON and MLflow)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any unparsable URL is shown as given
        return url


def open_storage(url: str, config: TuneConfig) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats: a trial whose process died is marked failed after the grace
    period and retried once, so a killed study resumes cleanly and workers can share it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        kwargs: dict[str, Any] = {}
        if config.heartbeat_interval:
            kwargs = {
                "heartbeat_interval": int(config.heartbeat_interval),
                "grace_period": int(config.grace_period or 2 * int(config.heartbeat_interval)),
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                ),
            }
        return optuna.storages.RDBStorage(url, **kwargs)


def make_sampler(space: SearchSpace, config: TuneConfig) -> optuna.samplers.BaseSampler:
    if space.mode == "grid":
        return optuna.samplers.GridSampler(space.grid_search_space(), seed=config.seed)
    return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.n_startup_trials)


def make_pruner(space: SearchSpace, config: TuneConfig) -> optuna.pruners.BasePruner:
    """Grid mode never prunes (every paper value is fully evaluated); search mode prunes on the
    running mean objective reported after each fact."""
    if space.mode == "grid" or config.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=config.n_startup_trials,
        n_warmup_steps=config.pruner_warmup_facts,
    )


def open_study(
    name: str, storage: optuna.storages.BaseStorage, space: SearchSpace, config: TuneConfig
) -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=make_sampler(space, config),
        pruner=make_pruner(space, config),
    )
