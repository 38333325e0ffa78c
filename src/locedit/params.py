"""The composed parameters (``params.yaml``, composed from ``conf/`` by Hydra) and the model they
name. Below ``pipeline/`` so that the sweep's workers and ``locedit edit`` can read parameters
without importing the stages."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from locedit.models.device import DTYPES, resolve_device
from locedit.models.loading import load_model

log = logging.getLogger(__name__)

__all__ = [
    "DTYPES", "compose_params", "load_params", "model_depth", "model_from_params", "to_container",
]


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


def model_depth(params: DictConfig) -> int:
    """The number of layers of ``params.model`` from its config alone (no weights), so that
    layer and window settings are checked in a second before a model loads."""
    from transformers import AutoConfig

    from locedit.models.discovery import config_n_layers
    from locedit.models.loading import ModelLoadError, resolve_model_path

    name = str(params.model.name)
    cache_dir = params.model.get("cache_dir")
    source = resolve_model_path(name, Path(cache_dir) if cache_dir else None)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the config of model {name!r}: {err}") from None
    return config_n_layers(SimpleNamespace(config=config))[1]


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


#: Groups whose keys ``--set`` may add: checked field by field against the hyperparameter
#: dataclasses (method, problem overrides) or the architecture spec (model.arch).
OPEN_GROUPS = ("method.", "problem.overrides.", "model.arch.")
_ABSENT = object()


def _unknown_message(keys: list[str]) -> str:
    return f"unknown key(s) {', '.join(keys)}: not in the params, so they would change nothing (a typo?)"


def apply_overrides(
    params: DictConfig,
    overrides: Iterable[str] | None,
    methods: Sequence[str] | None = None,
    problems: Sequence[str | None] | None = None,
) -> DictConfig:
    """Apply ``--set`` overrides (typed, see :func:`parse_override`) and check the result, before
    any model loads: values (:func:`check_params`), and that no override is shadowed by a more
    specific key for the run's ``methods`` x ``problems`` (default ``edit.methods`` x
    ``edit.problems``; ``[None]``: edits without a problem, as ``locedit edit``)."""
    from locedit.editing.overrides import check_shadowing, leaf_keys

    keys, unknown = [], []
    for override in overrides or []:
        key, value = parse_override(override)
        if not key.startswith(OPEN_GROUPS) and OmegaConf.select(params, key, default=_ABSENT) is _ABSENT:
            unknown.append(key)
        with open_dict(params):
            OmegaConf.update(params, key, value, merge=True)
        keys += leaf_keys(key, value)
    try:
        check_params(params)
    except ValueError as err:
        if unknown:
            raise ValueError(f"{err}; {_unknown_message(unknown)}") from None
        raise
    if unknown:
        raise ValueError(f"invalid parameters: {_unknown_message(unknown)}")
    edit = params.get("edit") or {}
    check_shadowing(
        params,
        keys,
        list(methods if methods is not None else edit.get("methods") or []),
        list(problems if problems is not None else edit.get("problems") or []),
    )
    return params


#: Counts and sizes that must be positive integers (``null`` means "all" or "default" where the
#: stage allows it), wherever they appear in the params tree.
POSITIVE_COUNTS = frozenset({
    "n_records", "max_facts", "noise_samples", "n_samples", "sample_length", "batch_size",
    "sample_batch_size", "max_new_tokens", "n_grid_layers", "workers", "threads", "steps",
    "v_steps", "n_context_templates", "n_facts", "n_trials", "n_layers", "bootstrap_samples",
    "n_startup_trials", "group_size",
})
#: Counts that may be zero but never negative.
NON_NEGATIVE_COUNTS = frozenset({"start", "n_heatmaps", "top_k", "template_top_k", "seed"})


def _device_problems(params: Any) -> list[str]:
    """model.device / model.dtype / edit.gpus_per_worker values that cannot work anywhere."""
    import re

    tree = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
    if not isinstance(tree, dict):
        return []
    out = []
    model, edit = tree.get("model") or {}, tree.get("edit") or {}
    device = model.get("device")
    if device is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device).lower()):
        out.append(f"model.device={device!r} (must be auto, cpu, cuda or cuda:N)")
    dtype = model.get("dtype")
    if dtype is not None and str(dtype) not in DTYPES:
        out.append(f"model.dtype={dtype!r} (must be one of {', '.join(DTYPES)})")
    gpus = edit.get("gpus_per_worker")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus <= 0):
        out.append(f"edit.gpus_per_worker={gpus!r} (must be a positive number)")
    return out


def _trace_problems(params: Any) -> list[str]:
    """Trace settings the trace stage would refuse (``trace.windows=[0]``), found at once."""
    from locedit.tracing.runner import TraceSettings

    trace = params.get("trace") if isinstance(params, DictConfig | dict) else None
    if not trace:
        return []
    try:
        TraceSettings.from_config(trace)
    except (ValueError, TypeError) as err:
        return [str(err)]
    return []


def check_params(params: Any) -> None:
    """Refuse negative or zero counts and sizes (``data.n_records=-5`` would otherwise be read
    as "all but the last 5") and method hyperparameters that do not fit their dataclass field
    (type, range, finite), naming every offending key in one line."""
    from locedit.editing.overrides import method_problems

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
    problems.extend(_device_problems(params))
    problems.extend(_trace_problems(params))
    problems.extend(method_problems(params))
    if problems:
        raise ValueError("invalid parameters: " + "; ".join(problems))
