"""Typed hyperparameters per editing method, built from the composed config.

Defaults live in ``conf/method/default.yaml``; the values below mirror them so that library
users without a config get the same edit. Problems override single fields (Fact Forcing runs
50 finetuning steps) through :func:`hparams_for`'s ``overrides`` or the config's
``problem.overrides.<problem>.<method>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from locedit.editing.layers import check_method

KeyPolicy = Literal["original", "consistent"]
FTParams = Literal["down_proj", "mlp"]


@dataclass(frozen=True)
class VStarHParams:
    """The v*/z* optimisation shared by ROME and MEMIT (ROME's ``compute_v``)."""

    v_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    #: Stop once the loss falls below this; ``None`` runs every step as the paper's code does.
    early_stop_loss: float | None = None
    #: Context templates: ``n_context_templates`` samples per total token length (ROME's
    #: ``context_template_length_params`` [[5, 10], [10, 10]]), plus the bare prompt.
    context_template_lengths: tuple[int, ...] = (5, 10)
    n_context_templates: int = 10
    template_top_k: int = 5
    kl_prompt: str = "{} is a"
    #: Noised requests (Fact Forcing): noise samples per context template; ``None`` pairs every
    #: template with every sample (cost x n_samples), k cycles k samples per template (cost x k).
    #: The bare prompt always gets every sample.
    noise_per_template: int | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, **overrides: Any):
        return _replace(self, overrides)


@dataclass(frozen=True)
class RomeHParams(VStarHParams):
    """ROME (Meng et al. 2022a) with the GPT-J defaults the paper used (App. A)."""

    #: ``original``: u from the template-averaged key, division by the prompt-only key (ROME,
    #: as the paper ran it). ``consistent``: the averaged key in both places (r-ROME).
    key_policy: KeyPolicy = "original"
    #: Relative ridge (x mean eigenvalue) added to the key covariance before solving; the solver
    #: raises it further on its own only when the covariance is singular or ill-conditioned.
    covariance_ridge: float = 0.0
    #: Flag an edit whose prompt-key/average-key division ratio falls outside [r, 1/r].
    flag_division_ratio: float = 0.1
    #: Flag an edit whose ||dW||_F / ||W||_F exceeds this.
    flag_update_ratio: float = 0.5


@dataclass(frozen=True)
class MemitHParams(VStarHParams):
    """MEMIT (Meng et al. 2022b) for one request; defaults from its GPT-J hyperparameters."""

    v_steps: int = 25
    clamp_norm_factor: float = 0.75
    context_template_lengths: tuple[int, ...] = (10,)
    n_context_templates: int = 5
    #: Layers in the window centred on the edit layer (the paper: 5, matching tracing).
    n_layers: int = 5
    #: Covariance weight lambda of GPT-J (d_mlp 16384). The realised share of the update is
    #: k^T C^-1 k / (lambda + k^T C^-1 k), and k^T C^-1 k grows with d_mlp, so lambda is scaled
    #: by d_mlp / ``mom2_weight_reference_d_mlp`` (``None``: use lambda as given).
    mom2_weight: float = 15000.0
    mom2_weight_reference_d_mlp: int | None = 16384
    covariance_ridge: float = 0.0
    flag_update_ratio: float = 0.5


@dataclass(frozen=True)
class FTHParams:
    """Constrained finetuning (Zhu et al. 2020) as the paper's code runs it."""

    steps: int = 25
    lr: float = 5e-4
    #: Radius of the L-infinity ball around the original weights.
    linf_eps: float = 1e-4
    weight_decay: float = 0.0
    #: ``down_proj``: the MLP down-projection weight and bias, as the paper's code
    #: (``rewrite_module_tmp = transformer.h.{}.mlp.fc_out``); ``mlp``: every MLP parameter.
    params: FTParams = "down_proj"
    #: Stop once the maximising loss (mean NLL per target token) falls below this (ROME's FT).
    early_stop_loss: float | None = 1e-2
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, **overrides: Any):
        return _replace(self, overrides)


HParams = RomeHParams | MemitHParams | FTHParams

_CLASSES: dict[str, type] = {
    "rome": RomeHParams,
    "memit": MemitHParams,
    "ft1": FTHParams,
    "ft5": FTHParams,
}
_SECTIONS: dict[str, tuple[str, ...]] = {
    "rome": ("rome",),
    "memit": ("memit",),
    "ft1": ("ft", "ft1"),
    "ft5": ("ft", "ft5"),
}


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (lists become tuples for frozen dataclasses)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _replace(instance, overrides: Mapping[str, Any]):
    known = {f.name for f in dataclasses.fields(instance)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown {type(instance).__name__} field(s) {unknown}; known: {sorted(known)}"
        )
    clean = {k: _plain(v) for k, v in overrides.items()}
    for name, value in clean.items():
        if value is None:
            continue
        default = getattr(instance, name)
        if isinstance(default, float) and isinstance(value, int):
            clean[name] = float(value)
    return dataclasses.replace(instance, **clean)


def hparams_for(
    method: str,
    config: Mapping[str, Any] | None = None,
    problem: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> HParams:
    """Hyperparameters of ``method`` from the composed config, a problem and explicit overrides.

    ``config`` is either the whole composed params (keys ``method``, optionally ``problem`` and
    ``seed``) or just the method group (keys ``rome``, ``memit``, ``ft``, optional ``ft1`` and
    ``ft5`` sections that refine ``ft``). Precedence, lowest first: dataclass defaults, the
    method group, ``problem.overrides.<problem>.<method>``, ``overrides``.
    """
    check_method(method)
    config = _plain(config) if config is not None else {}
    method_cfg = config.get("method", config)
    merged: dict[str, Any] = {}
    if "seed" in config and isinstance(config["seed"], int):
        merged["seed"] = config["seed"]
    for section in _SECTIONS[method]:
        merged.update(method_cfg.get(section) or {})
    if problem is not None:
        problem_overrides = (config.get("problem") or {}).get("overrides") or {}
        merged.update((problem_overrides.get(problem) or {}).get(method) or {})
    merged.update(_plain(dict(overrides or {})))
    return _replace(_CLASSES[method](), merged)


__all__ = [
    "FTHParams",
    "HParams",
    "KeyPolicy",
    "MemitHParams",
    "RomeHParams",
    "VStarHParams",
    "hparams_for",
]
