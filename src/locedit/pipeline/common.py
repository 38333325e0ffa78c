"""What every stage needs: the composed params, output paths and the model."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from locedit.params import (
    DTYPES,
    apply_overrides,
    check_params,
    compose_params,
    load_params,
    model_from_params,
    parse_override,
    to_container,
)

__all__ = [
    "DTYPES",
    "apply_overrides",
    "check_params",
    "compose_params",
    "load_params",
    "model_from_params",
    "output_dir",
    "parse_override",
    "to_container",
]


def output_dir(params: DictConfig, stage: str) -> Path:
    path = Path(params.paths.outputs) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path
