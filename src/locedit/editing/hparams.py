"""Typed hyperparameters per editing method, built from the composed config.

Defaults live in ``conf/method/default.yaml``; the values below mirror them so that library
users without a config get the same edit. Problems override single fields (Fact Forcing runs
50 finetuning steps) through :func:`locedit.editing.methods.hparams_for`'s ``overrides`` or the config's
``problem.overrides.<problem>.<method>``.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

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
    #: Adam's step size relative to the vector it changes: ``None`` takes ``v_lr`` as an
    #: absolute step (the paper's GPT-J setting, whose residual coordinates are of order 1);
    #: a number r makes the step r x RMS(v_init) = r x ||v_init|| / sqrt(d), so a step moves
    #: the same share of the vector on a model whose residual norms are in the thousands.
    v_lr_relative: float | None = None
    #: Stop once the mean p(target) of the rewriting rows reaches this (``None``: never).
    early_stop_prob: float | None = None
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
        return merge_overrides(self, overrides)


@dataclass(frozen=True)
class RomeHParams(VStarHParams):
    """ROME (Meng et al. 2022a) with the GPT-J defaults the paper used (App. A)."""

    #: ``original``: u from the template-averaged key, division by the prompt-only key (ROME,
    #: as the paper ran it). ``consistent``: the averaged key in both places (r-ROME).
    key_policy: KeyPolicy = "original"
    #: Relative ridge (x mean eigenvalue) added to the key covariance before solving; the solver
    #: raises it further on its own only when the covariance is singular or ill-conditioned.
    covariance_ridge: float = 0.0
    #: ``True``: u = C^-1 k / |C^-1 k| (ROME's update); ``False``: u = k / |k|, no second
    #: moments (the original code's ``mom2_adjustment: false``, for runs made without them).
    mom2_adjustment: bool = True
    #: Flag an edit whose prompt-key/average-key division ratio falls outside [r, 1/r].
    flag_division_ratio: float = 0.1
    #: Flag an edit whose ||dW||_F / ||W||_F exceeds this.
    flag_update_ratio: float = 0.5


@dataclass(frozen=True)
class SpreadHParams(VStarHParams):
    """MEMIT's z* optimisation and layer spread (Meng et al. 2022b, Sec. 4.3), shared by MEMIT,
    EMMET and AlphaEdit, which differ only in how each layer solves for its update
    (:mod:`locedit.editing.spread`); defaults from MEMIT's GPT-J hyperparameters."""

    v_steps: int = 25
    clamp_norm_factor: float = 0.75
    context_template_lengths: tuple[int, ...] = (10,)
    n_context_templates: int = 5
    #: Layers in the window centred on the edit layer (the paper: 5, matching tracing).
    n_layers: int = 5
    flag_update_ratio: float = 0.5
    #: Post-MLP norms (Gemma 2/3): Gauss-Newton steps that turn a layer's residual share into
    #: an MLP-output change (1: the first-order solution; more reach the share more closely in
    #: the residual stream but, measured on Gemma-3-270M, edit less: README, issue 16).
    post_norm_iterations: int = 1
    #: Facts in one update (MEMIT's batch, Meng et al. 2022b Alg. 1; EMMET's, Gupta et al.
    #: 2024): the edited fact together with ``batch_size - 1`` co-edited ones, each with its own
    #: z*, solved jointly per layer. 1 edits the fact alone (the paper's setting).
    batch_size: int = 1

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")


@dataclass(frozen=True)
class MemitHParams(SpreadHParams):
    """MEMIT (Meng et al. 2022b) for one request; defaults from its GPT-J hyperparameters."""

    #: Covariance weight lambda of GPT-J (d_mlp 16384). The realised share of the update is
    #: k^T C^-1 k / (lambda + k^T C^-1 k), and k^T C^-1 k grows with d_mlp, so lambda is scaled
    #: by d_mlp / ``mom2_weight_reference_d_mlp`` (``None``: use lambda as given).
    mom2_weight: float = 15000.0
    mom2_weight_reference_d_mlp: int | None = 16384
    covariance_ridge: float = 0.0


@dataclass(frozen=True)
class EmmetHParams(SpreadHParams):
    """EMMET (Gupta, Sajnani & Anumanchipalli 2024, arXiv 2403.14236): MEMIT's keys, z* and
    spread with the equality-constrained solve; defaults from its GPT-J hyperparameters
    (github.com/scalable-model-editing/unified-model-editing, ``hparams/EMMET``)."""

    #: The weight the reference scales the key covariance by (its ``mom2_update_weight``), scaled
    #: from GPT-J's d_mlp like MEMIT's. It cancels out of the update when ``emmet_lambda`` is 0.
    mom2_weight: float = 10000.0
    mom2_weight_reference_d_mlp: int | None = 16384
    #: Ridge lambda_emmet added to D = K^T (w C)^-1 K before inverting (the reference's default
    #: 0.1; 0 enforces W' k_j = W k_j + r_j exactly). The reference adds it only for batches of
    #: more than one key; locedit adds it for every batch size, single edits too (README).
    emmet_lambda: float = 0.1
    covariance_ridge: float = 0.0


@dataclass(frozen=True)
class AlphaEditHParams(SpreadHParams):
    """AlphaEdit (Fang et al., ICLR 2025, arXiv 2410.02355): MEMIT's keys, z* and spread with
    the update projected onto the null space of the preserved keys; defaults from its GPT-J
    hyperparameters (github.com/jianghoucheng/AlphaEdit, ``hparams/AlphaEdit``)."""

    #: Eigenvectors of E[k k^T] whose eigenvalue is below this span the null space (Sec. 3;
    #: the reference compares the eigenvalues of the raw second moment with it: absolute).
    nullspace_threshold: float = 2e-2
    #: ``True``: the threshold is relative to the mean eigenvalue trace(C)/d instead (models
    #: whose keys are on another scale than GPT-J's).
    nullspace_relative: bool = False
    #: Ridge of the projected normal equations (Sec. 3; the reference's ``L2``), absolute.
    L2: float = 10.0


@dataclass(frozen=True)
class FTHParams:
    """Constrained finetuning (Zhu et al. 2020) as the paper's code runs it."""

    steps: int = 25
    lr: float = 5e-4
    #: Radius of the L-infinity ball around the original weights.
    linf_eps: float = 1e-4
    #: The paper's radii are absolute numbers for GPT-J (d_mlp 16384). A change of at most eps
    #: per weight moves a down-projection's output by at most eps x ||k||_1, which grows with
    #: the key width d_mlp, so a narrower model needs a wider ball for the same reach. With a
    #: reference width the radius used is linf_eps x reference / d_mlp (``None``: as given).
    linf_reference_d_mlp: int | None = None
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
        return merge_overrides(self, overrides)


HParams = RomeHParams | MemitHParams | EmmetHParams | AlphaEditHParams | FTHParams

def plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (lists become tuples for frozen dataclasses)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, list):
        return tuple(plain(v) for v in value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


#: Ranges the fields must lie in (every value of the paper's App. A does): a step size, radius or
#: count of zero or below makes an edit fail deep inside the optimiser or silently do nothing.
POSITIVE = frozenset({
    "v_lr", "lr", "linf_eps", "clamp_norm_factor", "v_lr_relative", "flag_update_ratio",
    "v_steps", "steps", "template_top_k", "noise_per_template", "n_layers",
    "post_norm_iterations", "batch_size", "mom2_weight_reference_d_mlp", "linf_reference_d_mlp",
    "context_template_lengths",
})
#: (``n_context_templates`` 0 and no lengths: the bare prompt alone.)
NON_NEGATIVE = frozenset({
    "n_context_templates", "kl_factor", "weight_decay", "early_stop_loss", "covariance_ridge", "mom2_weight",
    "emmet_lambda", "nullspace_threshold", "L2", "seed",
})
#: Probabilities in [0, 1] (0: stop at once), and the division-ratio flag's r of [r, 1/r] in (0, 1].
PROBABILITIES = frozenset({"early_stop_prob"})
RATIOS = frozenset({"flag_division_ratio"})


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None: it fits)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _type_problem(value, inner[0]) if len(inner) == 1 else None
    if value is None:
        return "must not be null"
    if origin is Literal:
        return None if value in args else f"must be one of {list(args)}"
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return "must be a list"
        return next((f"item {v!r} {p}" for v in value if (p := _type_problem(v, args[0]))), None)
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    return None


def _range_problem(name: str, value: Any) -> str | None:
    values = value if isinstance(value, tuple | list) else (value,)
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if name in POSITIVE and any(v <= 0 for v in numbers):
        return "must be positive"
    if name in NON_NEGATIVE and any(v < 0 for v in numbers):
        return "must be zero or positive"
    if name in PROBABILITIES and any(not 0 <= v <= 1 for v in numbers):
        return "must be in [0, 1]"
    if name in RATIOS and any(not 0 < v <= 1 for v in numbers):
        return "must be in (0, 1]"
    return None


def field_problems(cls: type, values: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> list[str]:
    """``KEY=VALUE (why)`` for every value that does not fit its field's type or range; ``keys``
    names each field's params key (default ``<Class>.<field>``)."""
    hints = get_type_hints(cls)
    out = []
    for name, value in values.items():
        if name not in hints:
            continue
        why = _type_problem(value, hints[name])
        if why is None and value is not None:
            why = _range_problem(name, value)
        if why:
            key = (keys or {}).get(name, f"{cls.__name__}.{name}")
            out.append(f"{key}={value!r} ({why})")
    return out


def merge_overrides(instance, overrides: Mapping[str, Any], keys: Mapping[str, str] | None = None):
    """``instance`` with ``overrides`` applied, refusing unknown fields and values of the wrong
    type or range in one line that names each offending key (``keys``: field -> params key)."""
    known = {f.name for f in dataclasses.fields(instance)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        named = [(keys or {}).get(k, k) for k in unknown]
        raise ValueError(
            f"unknown {type(instance).__name__} field(s) {named}; known: {sorted(known)}"
        )
    clean = {k: plain(v) for k, v in overrides.items()}
    for name, value in clean.items():
        if value is None:
            continue
        default = getattr(instance, name)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            clean[name] = float(value)
    problems = field_problems(type(instance), clean, keys)
    if problems:
        raise ValueError("invalid hyperparameters: " + "; ".join(problems))
    return dataclasses.replace(instance, **clean)


__all__ = [
    "AlphaEditHParams",
    "EmmetHParams",
    "FTHParams",
    "HParams",
    "KeyPolicy",
    "MemitHParams",
    "RomeHParams",
    "SpreadHParams",
    "VStarHParams",
    "field_problems",
    "merge_overrides",
    "plain",
]
