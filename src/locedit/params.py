"""The composed parameters (``params.yaml``, composed from ``conf/`` by Hydra) and the model they
name. Below ``pipeline/`` so that the sweep's workers and ``locedit edit`` can read parameters
without importing the stages."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from locedit.models.loading import load_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


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
def _cached_model(name: str, cache_dir: str | None, dtype: str, arch: tuple = ()):
    return load_model(name, Path(cache_dir) if cache_dir else None, DTYPES[dtype], dict(arch))


def model_from_params(params: DictConfig):
    """(model, tokenizer) for ``params.model``; loaded once per process."""
    cfg = params.model
    arch = {k: v for k, v in to_container(cfg.get("arch") or {}).items() if v is not None}
    return _cached_model(
        str(cfg.name),
        cfg.get("cache_dir"),
        str(cfg.get("dtype", "float32")),
        tuple(sorted(arch.items())),
    )


def to_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def parse_override(override: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE typed as Hydra types an override: numbers, booleans, ``null``,
    lists ``[a,b]`` and dicts; an empty value means ``null``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {override!r}: expected KEY=VALUE, e.g. method.rome.kl_factor=0.9")
    if not value.strip():
        return key.strip(), None
    try:
        parsed = OverridesParser.create().parse_overrides([override])[0]
    except HydraException as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"--set {override!r}: cannot parse the value ({reason})") from None
    return parsed.key_or_group, _plain(parsed.value())


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def apply_overrides(params: DictConfig, overrides: Iterable[str] | None) -> DictConfig:
    """Apply ``--set`` overrides (typed, see :func:`parse_override`) and check the result."""
    for override in overrides or []:
        key, value = parse_override(override)
        OmegaConf.update(params, key, value, merge=True)
    check_params(params)
    return params


#: Counts and sizes that must be positive integers (``null`` means "all" or "default" where the
#: stage allows it), wherever they appear in the params tree.
POSITIVE_COUNTS = frozenset({
    "n_records", "max_facts", "noise_samples", "n_samples", "sample_length", "batch_size",
    "sample_batch_size", "max_new_tokens", "n_grid_layers", "workers", "threads", "steps",
    "v_steps", "n_context_templates", "n_facts", "n_trials", "n_layers", "bootstrap_samples",
    "n_startup_trials",
})
#: Counts that may be zero but never negative.
NON_NEGATIVE_COUNTS = frozenset({"start", "n_heatmaps", "top_k", "template_top_k", "seed"})


def check_params(params: Any) -> None:
    """Refuse negative or zero counts and sizes (``data.n_records=-5`` would otherwise be read
    as "all but the last 5"), naming every offending key in one line."""
    problems: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif key in POSITIVE_COUNTS or key in NON_NEGATIVE_COUNTS:
                minimum = 1 if key in POSITIVE_COUNTS else 0
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                    kind = "a positive integer" if minimum else "a non-negative integer"
                    problems.append(f"{path}={value!r} (must be {kind} or null)")

    walk(params, "")
    if problems:
        raise ValueError("invalid parameters: " + "; ".join(problems))
