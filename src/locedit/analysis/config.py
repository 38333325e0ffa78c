"""Typed analysis settings, built once from ``params.analysis`` (defaults live in conf/analysis/)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

#: Edit-success columns of outputs/edit/results.parquet that the regressions can explain.
SCORE_COLUMNS = (
    "rewrite_score",
    "paraphrase_score",
    "neighborhood_score",
    "essence_score",
    "overall_score",
    "overall_score_with_essence",
)


@dataclass(frozen=True)
class TraceSpec:
    """Which localization effect is the regressor ``trace`` (paper §4.1: max over tokens, window 5)."""

    method: str = "tracing"  # tracing | zeroing
    kind: str = "mlp"  # mlp | attn | resid
    window: int = 5
    statistic: str = "effect_max"  # effect_max | effect_last_subject

    def label(self) -> str:
        what = "representation zeroing" if self.method == "zeroing" else "causal tracing"
        token = (
            "last subject token" if self.statistic == "effect_last_subject" else "max over tokens"
        )
        return f"{what}, {self.kind.upper()}, window {self.window}, {token}"

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> TraceSpec:
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown analysis.trace keys: {sorted(unknown)}")
        if "window" in cfg:
            cfg["window"] = int(cfg["window"])
        return cls(**cfg)


@dataclass(frozen=True)
class RandomBaselineSpec:
    """The random-location baseline (beyond the paper; Wang & Veitch 2025, arXiv 2502.11447):
    edit success at the tracing-chosen, the default and a random edited layer per fact."""

    enabled: bool = True
    draws: int = 1000  # random layer assignments (Monte-Carlo check and p-value)
    metrics: tuple[str, ...] | None = ("rewrite_score", "overall_score")  # None: analysis.metrics

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ValueError("analysis.random_baseline.draws must be >= 1")
        bad = [m for m in self.metrics or () if m not in SCORE_COLUMNS]
        if bad:
            raise ValueError(
                f"analysis.random_baseline.metrics {bad} not among {list(SCORE_COLUMNS)}"
            )

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> RandomBaselineSpec:
        cfg = dict(cfg or {})
        unknown = set(cfg) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown analysis.random_baseline keys: {sorted(unknown)}")
        if cfg.get("metrics") is not None:
            cfg["metrics"] = tuple(cfg["metrics"])
        return cls(**cfg)


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything the analyze stage reads; see conf/analysis/default.yaml for the meaning of each."""

    metrics: tuple[str, ...] = (
        "rewrite_score",
        "paraphrase_score",
        "neighborhood_score",
        "overall_score",
    )
    trace: TraceSpec = field(default_factory=TraceSpec)
    variants: tuple[str, ...] = ("last_subject", "zeroing", "windows", "concentrated")
    main_dataset: str | None = "counterfact"
    drop_low_denominator: bool = True
    trace_regressor: str = "fraction"  # fraction | reference_code (analysis.data.TRACE_REGRESSORS)
    score_floor: str = "none"  # none | reference_code (analysis.data.SCORE_FLOORS)
    bootstrap_samples: int = 200
    ci_level: float = 0.95
    concentrated_max_other_layers: int = 3
    concentrated_fraction: float = 0.5
    mixed_effects: bool = True
    figure_layer: int | None = None
    seed: int = 0
    log_mlflow: bool = True
    random_baseline: RandomBaselineSpec = field(default_factory=RandomBaselineSpec)

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in SCORE_COLUMNS]
        if bad:
            raise ValueError(f"analysis.metrics {bad} not among {list(SCORE_COLUMNS)}")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"analysis.ci_level must be in (0, 1), got {self.ci_level}")
        if self.bootstrap_samples < 0:
            raise ValueError("analysis.bootstrap_samples must be >= 0")
        if self.trace_regressor not in ("fraction", "reference_code"):
            raise ValueError(
                f"analysis.trace_regressor {self.trace_regressor!r}: fraction | reference_code"
            )
        if self.score_floor not in ("none", "reference_code"):
            raise ValueError(f"analysis.score_floor {self.score_floor!r}: none | reference_code")
        allowed = {"last_subject", "zeroing", "windows", "concentrated"}
        unknown = set(self.variants) - allowed
        if unknown:
            raise ValueError(f"analysis.variants {sorted(unknown)} not among {sorted(allowed)}")

    @classmethod
    def from_params(cls, analysis: Mapping[str, Any] | None, seed: int = 0) -> AnalysisConfig:
        """Build from the ``analysis`` block of params.yaml (unknown keys are an error)."""
        cfg = dict(analysis or {})
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown analysis keys: {sorted(unknown)}")
        cfg.setdefault("seed", seed)
        if "trace" in cfg:
            cfg["trace"] = TraceSpec.from_mapping(cfg["trace"])
        if "random_baseline" in cfg:
            cfg["random_baseline"] = RandomBaselineSpec.from_mapping(cfg["random_baseline"])
        for key in ("metrics", "variants"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        return cls(**cfg)
