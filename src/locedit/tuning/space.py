"""What each study tunes (paper App. A) and how it is configured.

ROME and MEMIT tune the KL regularisation weight of the v* optimisation; constrained
finetuning (FT-1, FT-5) tunes the radius of its L-infinity ball. ``grid`` mode evaluates the
paper's values exactly; ``search`` mode lets TPE explore log-uniform ranges around them and,
where the paper changed the number of optimisation steps (Fact Forcing: FT 25 -> 50, ROME
v* 20 -> 25), also chooses between the two step counts.

Methods beyond the paper tune the same KL weight of their z* and, through the registry's
``extra_tuned_fields``, their own hyperparameters (EMMET's ``emmet_lambda``, AlphaEdit's
``nullspace_threshold``): always in ``search`` mode (``tune.search.<field>`` ranges), and in
``grid`` mode when ``tune.grid.<field>`` lists values (the grid is then the product).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna

from locedit.editing.methods import REGISTRY, get_method

Mode = Literal["grid", "search"]
Fallback = Literal["least_violation", "conf"]
MODES: tuple[str, ...] = ("grid", "search")
FALLBACKS: tuple[str, ...] = ("least_violation", "conf")
OBJECTIVES: tuple[str, ...] = ("overall_score", "overall_score_with_essence")

#: The hyperparameter each method is tuned over (App. A), from the method registry.
TUNED_FIELDS: dict[str, str] = {name: m.tuned_field for name, m in REGISTRY.items()}

#: The optimisation-steps field of each method (v* steps for ROME/MEMIT, Adam steps for FT).
STEP_FIELDS: dict[str, str] = {name: m.steps_field for name, m in REGISTRY.items()}

#: The paper's grids (App. A): KL weight for ROME/MEMIT, L-infinity radius for finetuning.
PAPER_HPARAM_GRIDS: dict[str, tuple[float, ...]] = {
    "kl_factor": (0.0625, 0.9, 1.0),
    "linf_eps": (1e-4, 5e-5, 2e-5, 1e-5),
}

#: Log-uniform ranges for ``search`` mode: about a decade beyond the paper's grid each way;
#: for EMMET's ridge and AlphaEdit's threshold about two decades around the references' 0.1
#: and 2e-2.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "kl_factor": (1e-2, 10.0),
    "linf_eps": (1e-6, 1e-3),
    "emmet_lambda": (1e-3, 10.0),
    "nullspace_threshold": (1e-4, 1.0),
}

#: Where the paper changed the number of steps (App. A, Fact Forcing): the choices to search.
DEFAULT_STEP_CHOICES: dict[str, dict[str, tuple[int, ...]]] = {
    "fact_forcing": {name: m.forcing_steps for name, m in REGISTRY.items()},
}


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune`` config group as typed data (``conf/tune/default.yaml`` documents each field)."""

    enabled: bool = False
    mode: Mode = "grid"
    n_facts: int | None = 100
    layer: int | None = None
    n_trials: int = 20
    storage: str = "sqlite:///outputs/tune/state/optuna.db"
    max_rewrite: float = 0.99
    objective: str = "overall_score"
    fallback: Fallback = "least_violation"
    grid: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(PAPER_HPARAM_GRIDS))
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_RANGES))
    step_choices: Mapping[str, Mapping[str, tuple[int, ...]]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_STEP_CHOICES.items()}
    )
    n_startup_trials: int = 5
    pruner: Literal["median", "none"] = "median"
    pruner_warmup_facts: int = 10
    heartbeat_interval: int | None = 60
    grace_period: int | None = 180
    plots: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"tune.mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"tune.fallback {self.fallback!r}: choose from {', '.join(FALLBACKS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"tune.objective {self.objective!r}: choose from {', '.join(OBJECTIVES)}"
            )
        if self.pruner not in ("median", "none"):
            raise ValueError(f"tune.pruner {self.pruner!r}: choose median or none")
        if self.n_facts is not None and self.n_facts < 1:
            raise ValueError("tune.n_facts must be at least 1 (or null for every fact)")
        for name, (low, high) in self.ranges.items():
            if not 0 < low < high:
                raise ValueError(f"tune.search.{name} needs 0 < low < high for a log-uniform range")

    @classmethod
    def from_params(cls, tune: Mapping[str, Any], seed: int = 0, **overrides: Any) -> TuneConfig:
        """From the composed ``tune`` group; ``overrides`` (e.g. ``mode``) win over it."""
        cfg = dict(tune or {})
        search = dict(cfg.get("search") or {})
        grid = {k: tuple(float(x) for x in v) for k, v in (cfg.get("grid") or PAPER_HPARAM_GRIDS).items()}
        ranges = {
            name: (float(search[name][0]), float(search[name][1])) if name in search else default
            for name, default in DEFAULT_RANGES.items()
        }
        steps = search.get("steps", DEFAULT_STEP_CHOICES) or {}
        step_choices = {
            problem: {
                method: tuple(int(x) for x in choices) for method, choices in (per or {}).items()
            }
            for problem, per in steps.items()
        }
        values = {
            "enabled": bool(cfg.get("enabled", False)),
            "mode": cfg.get("mode", "grid"),
            "n_facts": None if cfg.get("n_facts") is None else int(cfg["n_facts"]),
            "layer": None if cfg.get("layer") is None else int(cfg["layer"]),
            "n_trials": int(cfg.get("n_trials", 20)),
            "storage": str(cfg.get("storage") or cls.storage),
            "max_rewrite": float(cfg.get("max_rewrite", 0.99)),
            "objective": str(cfg.get("objective", "overall_score")),
            "fallback": cfg.get("fallback", "least_violation"),
            "grid": grid,
            "ranges": ranges,
            "step_choices": step_choices,
            "n_startup_trials": int(search.get("n_startup_trials", 5)),
            "pruner": str(search.get("pruner", "median") or "none"),
            "pruner_warmup_facts": int(search.get("pruner_warmup_facts", 10)),
            "heartbeat_interval": cfg.get("heartbeat_interval", 60),
            "grace_period": cfg.get("grace_period", 180),
            "plots": bool(cfg.get("plots", True)),
            "seed": int(seed),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class ExtraField:
    """A method's own hyperparameter tuned beside the KL weight: its grid (may be empty: not in
    ``grid`` mode) and its log-uniform range."""

    name: str
    grid: tuple[float, ...]
    low: float
    high: float


@dataclass(frozen=True)
class SearchSpace:
    """The hyperparameters one (method, problem) study chooses, and how a trial suggests them."""

    method: str
    problem: str
    mode: Mode
    field: str
    grid: tuple[float, ...]
    low: float
    high: float
    step_field: str | None = None
    step_choices: tuple[int, ...] = ()
    #: the method's own hyperparameters (``grid`` mode: only those with a grid)
    extras: tuple[ExtraField, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        """Hyperparameter fields a trial sets (Optuna parameter names are these field names)."""
        extras = tuple(extra.name for extra in self.extras)
        return (self.field, *extras) + ((self.step_field,) if self.step_field else ())

    def _grids(self) -> dict[str, tuple[float, ...]]:
        return {self.field: self.grid, **{extra.name: extra.grid for extra in self.extras}}

    def grid_points(self) -> list[dict[str, float]]:
        """Every point of the grid, in the paper's order (the product over the fields)."""
        grids = self._grids()
        return [dict(zip(grids, values, strict=True)) for values in itertools.product(*grids.values())]

    def grid_search_space(self) -> dict[str, list[float]]:
        """The search space in :class:`optuna.samplers.GridSampler`'s format."""
        return {name: list(values) for name, values in self._grids().items()}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's hyperparameter overrides (``grid``: values come from the grid sampler)."""
        if self.mode == "grid":
            values: dict[str, Any] = {}
            for name, grid in self._grids().items():
                low, high = min(grid), max(grid)
                values[name] = trial.suggest_float(name, low, high, log=low > 0)
            return values
        values = {self.field: trial.suggest_float(self.field, self.low, self.high, log=True)}
        for extra in self.extras:
            values[extra.name] = trial.suggest_float(extra.name, extra.low, extra.high, log=True)
        if self.step_field:
            values[self.step_field] = trial.suggest_categorical(
                self.step_field, list(self.step_choices)
            )
        return values

    def contains(self, point: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
        """Whether a trial's ``params`` are the grid ``point`` (floats compared with tolerance)."""
        return all(
            name in params
            and math.isclose(float(params[name]), float(value), rel_tol=1e-9, abs_tol=0.0)
            for name, value in point.items()
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "problem": self.problem,
            "mode": self.mode,
            "field": self.field,
        }
        if self.mode == "grid":
            out["grid"] = list(self.grid)
        else:
            out["range"] = [self.low, self.high]
            if self.step_field:
                out[self.step_field] = list(self.step_choices)
        for extra in self.extras:  # absent for the paper's methods: their identity is unchanged
            out[extra.name] = list(extra.grid) if self.mode == "grid" else [extra.low, extra.high]
        return out


def search_space(method: str, problem: str, config: TuneConfig) -> SearchSpace:
    """The space of one study, from the config's grids, ranges and step choices."""
    spec = get_method(method)
    name = spec.tuned_field
    grid = tuple(float(x) for x in config.grid.get(name, PAPER_HPARAM_GRIDS[name]))
    if not grid:
        raise ValueError(f"tune.grid.{name} is empty")
    low, high = config.ranges.get(name, DEFAULT_RANGES[name])
    choices: Sequence[int] = ()
    if config.mode == "search":
        choices = tuple((config.step_choices.get(problem) or {}).get(method) or ())
    extras = []
    for extra in spec.extra_tuned_fields:
        extra_grid = tuple(float(x) for x in config.grid.get(extra, ()))
        if config.mode == "grid" and not extra_grid:
            continue
        extra_low, extra_high = config.ranges.get(extra, DEFAULT_RANGES[extra])
        extras.append(ExtraField(extra, extra_grid, extra_low, extra_high))
    return SearchSpace(
        method=method,
        problem=problem,
        mode=config.mode,
        field=name,
        grid=grid,
        low=low,
        high=high,
        step_field=spec.steps_field if len(choices) > 1 else None,
        step_choices=tuple(choices),
        extras=tuple(extras),
    )
