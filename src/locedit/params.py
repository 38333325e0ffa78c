"""The composed parameters (``params.yaml``, composed from ``conf/`` by Hydra) and the model they
name. Below ``pipeline/`` so that the sweep's workers and ``locedit edit`` can read parameters
without importing the stages."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from locedit.models.device import DTYPES, resolve_device
from locedit.models.loading import load_model

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "compose_params", "load_params", "model_from_params", "to_container"]


def load_params(path: Path | str = "params.yaml") -> DictConfig:
    """The composed parameters that dvc.yaml stages read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `locedit compose` to write it from conf/")
    return OmegaConf.load(path)


def compose_params(conf_dir: Path | str = "conf", overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/`` with Hydra overrides (e.g. ``experiment=paper``)."""
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return cfg


@lru_cache(maxsize=2)
def _cached_model(
    name: str, cache_dir: str | None, dtype: str, arch: tuple = (), device: str = "cpu"
):
    if dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return load_model(
        name, Path(cache_dir) if cache_dir else None, DTYPES[dtype], dict(arch), device=device
    )


def model_from_params(params: DictConfig):
    """(model, tokenizer) for ``params.model`` on ``model.device`` (``auto``: CUDA when
    available, else CPU) in ``model.dtype``; loaded once per process."""
    cfg = params.model
    arch = {k: v for k, v in to_container(cfg.get("arch") or {}).items() if v is not None}
    return _cached_model(
        str(cfg.name),
        cfg.get("cache_dir"),
        str(cfg.get("dtype", "float32")),
        tuple(sorted(arch.items())),
        str(resolve_device(cfg.get("device", "auto"))),
    )


def to_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
