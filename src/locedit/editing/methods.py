"""The method registry: one :class:`EditMethod` per editing method of the paper (Sec. 5.2).

Everything the rest of locedit needs to know about a method is here: its hyperparameter class
and config sections, whether it needs key statistics (the covariance of the MLP keys and the
context templates), which layers an edit "at layer l" touches, which parameters it changes,
what tuning chooses for it (App. A) and how to run it. The editor, the stats and tune stages,
the sweep planner and the benchmarks ask the registry; nothing else matches method names.

Adding a method (r-ROME, ...) is one module with its ``apply`` function plus one entry in
:data:`REGISTRY`; EMMET and AlphaEdit were added so (they are not in the paper, so they are
selectable but not among the default :data:`METHODS`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from locedit.editing.hparams import (
    AlphaEditHParams,
    EmmetHParams,
    FTHParams,
    HParams,
    MemitHParams,
    RomeHParams,
    merge_overrides,
    plain,
)
from locedit.editing.types import EditCall, EditRequest
from locedit.models.architecture import down_proj_name
from locedit.models.device import attention_without_cudnn
from locedit.models.hooks import window_layers

#: How a method runs: an :class:`~locedit.editing.types.EditCall` -> EditResult, editing the
#: model in place (the editor restores it). A ``"module:function"`` string is imported on first use, so a method's heavy
#: dependencies (Lightning for finetuning) load only when it runs.
Apply = Callable[..., Any] | str


@dataclass(frozen=True)
class EditMethod:
    """One editing method: what it is configured by, what it touches and how it runs."""

    name: str
    hparams: type
    #: sections of the ``method`` config group merged in order (``ft`` then ``ft1``)
    config_sections: tuple[str, ...]
    #: needs key statistics and context templates (a CovarianceStore)
    needs_key_stats: bool
    #: layers one edit spreads over, centred on the edit layer (the paper's window)
    window: int
    #: the hyperparameter field tuning chooses (App. A) and the optimisation-steps field
    tuned_field: str
    steps_field: str
    #: the step counts the paper used for Fact Forcing (App. A), searched in ``search`` mode
    forcing_steps: tuple[int, ...]
    apply: Apply
    changed_params: Callable[[nn.Module, list[int], Any], list[str]]
    #: a hyperparameter that overrides ``window`` (MEMIT's ``n_layers``)
    window_field: str | None = None
    #: one of the paper's methods (Sec. 5.2): in :data:`METHODS`, the default method list
    in_paper: bool = True
    #: the method's own hyperparameters ``search`` mode also explores (``tune.search.<field>``
    #: ranges; ``grid`` mode adds them when ``tune.grid.<field>`` lists values)
    extra_tuned_fields: tuple[str, ...] = ()
    #: EditCall -> the v*/z* optimisations (``VStarJob``) the method would run, in order, so
    #: that independent edits can optimise theirs together (:mod:`locedit.editing.grouped`);
    #: ``None``: the method has none (finetuning)
    vstar_jobs: Apply | None = None
    #: (model, tokenizer, GroupedEdits, covariance) -> each edit's outcome: the method's
    #: optimisations of independent edits run as one batch (issue 28), handed to ``apply``
    #: through ``EditCall.vstars`` (v*/z*: :func:`locedit.editing.grouped.grouped_vstars`;
    #: finetuning: :func:`locedit.editing.grouped_finetune.finetune_group`); ``None``: none
    batched_fit: Apply | None = None

    @property
    def groupable(self) -> bool:
        """Whether independent edits of this method can optimise together (issue 28)."""
        return self.batched_fit is not None

    def window_for(self, hparams: HParams | None = None) -> int:
        """The window size: the hyperparameter ``window_field`` names, if any, else ``window``."""
        if hparams is not None and self.window_field is not None:
            return int(getattr(hparams, self.window_field))
        return self.window

    def layers(self, layer: int, n_layers: int, hparams: HParams | None = None) -> list[int]:
        """Layers an edit centred on ``layer`` changes.

        ROME and FT-1 edit ``layer`` alone. MEMIT and FT-5 edit the window of 5 centred on it,
        ``[l - 2, l + 2]``, clipped (not shifted) at the model's ends: the paper's code uses the
        same rule as Causal Tracing's restoration window so the two cover identical layers
        (Sec. 5.2; App. Fig. 11 describes the clipping), so an edit at layer 0 touches 0..2.
        """
        if not 0 <= layer < n_layers:
            raise IndexError(
                f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}"
            )
        return list(window_layers(layer, self.window_for(hparams), n_layers))

    @property
    def code_modules(self) -> tuple[str, ...]:
        """The modules that compute this method's edit (cache keys version their code): its
        ``apply``, its v*/z* jobs if any, and its batched optimisation for grouped sweeps
        (``editing/grouped.py`` or ``editing/grouped_finetune.py``: neither imports the
        other, so a change to one reruns only its methods' rows)."""
        modules = [_module_of(self.apply)]
        if self.vstar_jobs is not None:
            modules.append(_module_of(self.vstar_jobs))
        if self.batched_fit is not None:
            modules.append(_module_of(self.batched_fit))
        return tuple(dict.fromkeys(modules))

    def fit_together(self, *args: Any) -> list:
        """Run :attr:`batched_fit` (a method without one cannot: ``ValueError``)."""
        if self.batched_fit is None:
            raise ValueError(f"{self.name} has no batched optimisation")
        return _resolved(self.batched_fit)(*args)

    def run(
        self,
        model,
        tokenizer,
        request,
        layer,
        layers,
        hparams,
        covariance,
        templates,
        co_requests: Sequence[EditRequest] = (),
        vstars: Sequence[Any] = (),
    ):
        """Apply one edit in place (use :func:`locedit.editing.edited`, which restores it)."""
        check_batch(self.name, hparams, co_requests)
        call = self.call(
            model, tokenizer, request, layer, layers, hparams, covariance, templates,
            co_requests, vstars,
        )
        with attention_without_cudnn():  # bfloat16 on Hopper: NaN gradients on cuDNN
            return _resolved(self.apply)(call)

    def call(
        self, model, tokenizer, request, layer, layers, hparams, covariance, templates,
        co_requests: Sequence[EditRequest] = (), vstars: Sequence[Any] = (),
    ) -> EditCall:
        """The :class:`EditCall` that :meth:`run` hands to ``apply``."""
        return EditCall(
            model,
            tokenizer,
            request,
            self.name,
            layer,
            layers,
            hparams,
            covariance,
            templates,
            tuple(co_requests),
            tuple(vstars),
        )

    def jobs(self, call: EditCall) -> list:
        """The v*/z* optimisations ``call`` would run (empty for a method without any)."""
        return [] if self.vstar_jobs is None else list(_resolved(self.vstar_jobs)(call))

    def params(self, model: nn.Module, layers: list[int], hparams: HParams) -> list[str]:
        """Names of every parameter the edit may change (what the snapshot must cover)."""
        return self.changed_params(model, layers, hparams)

    def hparams_from(
        self,
        config: Mapping[str, Any] | None = None,
        problem: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> HParams:
        """Hyperparameters from the composed config, a problem and explicit overrides.

        ``config`` is either the whole composed params (keys ``method``, optionally ``model``,
        ``problem`` and ``seed``) or just the method group (keys ``rome``, ``memit``, ``ft``,
        optional ``ft1`` and ``ft5`` sections that refine ``ft``, optional ``per_model``).
        Precedence, lowest first: dataclass defaults, the method group, the model's defaults
        ``method.per_model.<model.name>.<section>`` (settings that make a method edit a model
        the paper's GPT-J values were not tuned for), ``problem.overrides.<problem>.<method>``,
        ``overrides``.
        """
        merged: dict[str, Any] = {}
        keys: dict[str, str] = {}
        for prefix, values in self.config_sources(config, problem, overrides):
            for name, value in values.items():
                merged[name] = value
                keys[name] = f"{prefix}.{name}" if prefix else name
        return merge_overrides(self.hparams(), merged, keys)

    def config_sources(
        self,
        config: Mapping[str, Any] | None = None,
        problem: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        """(params key prefix, values) of every source :meth:`hparams_from` merges, lowest
        precedence first (``overrides`` under the prefix ``overrides``), so that a refused or
        shadowed value can be reported under the key that set it."""
        config = plain(config) if config is not None else {}
        method_cfg = config.get("method", config)
        model_name = (config.get("model") or {}).get("name")
        per_model = (method_cfg.get("per_model") or {}).get(model_name) or {}
        sources: list[tuple[str, dict[str, Any]]] = []
        if "seed" in config and isinstance(config["seed"], int):
            sources.append(("", {"seed": config["seed"]}))
        sources += [(f"method.{s}", dict(method_cfg.get(s) or {})) for s in self.config_sections]
        sources += [
            (f"method.per_model.{model_name}.{s}", dict(per_model.get(s) or {}))
            for s in self.config_sections
        ]
        if problem is not None:
            by_problem = ((config.get("problem") or {}).get("overrides") or {}).get(problem)
            sources.append(
                (f"problem.overrides.{problem}.{self.name}", dict((by_problem or {}).get(self.name) or {}))
            )
        sources.append(("overrides", dict(plain(dict(overrides or {})))))
        return sources


def _module_of(function: Apply) -> str:
    """The dotted module of a registry entry's function (``"module:name"`` or a callable)."""
    return function.partition(":")[0] if isinstance(function, str) else function.__module__


def _resolved(apply: Apply) -> Callable[..., Any]:
    """``apply`` itself, or the function a ``"module:function"`` string names (imported now)."""
    if isinstance(apply, str):
        module, _, name = apply.partition(":")
        return getattr(importlib.import_module(module), name)
    return apply


def check_batch(method: str, hparams: Any, co_requests: Sequence[EditRequest]) -> None:
    """Refuse co-edited requests that the hyperparameters do not ask for, and the reverse.

    A method edits ``batch_size`` facts per update (MEMIT's and EMMET's batch; 1 where the
    hyperparameters have no ``batch_size``), so exactly ``batch_size - 1`` requests must come
    with the edited one: none are silently dropped and no batch is silently smaller.
    """
    batch_size = int(getattr(hparams, "batch_size", 1))
    if len(co_requests) == batch_size - 1:
        return
    if not hasattr(hparams, "batch_size"):
        raise ValueError(
            f"{method} edits one fact per update (its hyperparameters have no batch_size): "
            f"got {len(co_requests)} co-edited request(s)"
        )
    raise ValueError(
        f"{method} with batch_size {batch_size} edits the fact together with "
        f"{batch_size - 1} co-edited request(s), got {len(co_requests)}"
    )


# --------------------------------------------------------------------------- the methods


def _down_projections(model: nn.Module, layers: list[int], _hparams) -> list[str]:
    return [down_proj_name(model, layer) for layer in layers]


def _finetuned(model: nn.Module, layers: list[int], hparams) -> list[str]:
    from locedit.editing.finetune import finetuned_param_names

    return finetuned_param_names(model, layers, hparams.params)


def _closed_form(
    name: str,
    hparams: type,
    window: int,
    apply: Apply,
    window_field: str | None = None,
    in_paper: bool = True,
    extra_tuned_fields: tuple[str, ...] = (),
    vstar_jobs: Apply = "locedit.editing.spread:spread_vstar_jobs",
    batched_fit: Apply = "locedit.editing.grouped:grouped_vstars",
) -> EditMethod:
    """ROME, MEMIT, EMMET, AlphaEdit: a closed-form update of down-projections from key
    statistics, with the KL weight of the v*/z* optimisation tuned (App. A: 20 -> 25 v* steps
    for Fact Forcing)."""
    return EditMethod(
        name=name,
        hparams=hparams,
        config_sections=(name,),
        needs_key_stats=True,
        window=window,
        tuned_field="kl_factor",
        steps_field="v_steps",
        forcing_steps=(20, 25),
        apply=apply,
        changed_params=_down_projections,
        window_field=window_field,
        in_paper=in_paper,
        extra_tuned_fields=extra_tuned_fields,
        vstar_jobs=vstar_jobs,
        batched_fit=batched_fit,
    )


def _constrained_finetune(name: str, window: int) -> EditMethod:
    """FT-1 / FT-5: Adam in an L-infinity ball around the weights of ``window`` layers, with its
    radius tuned (App. A: 25 -> 50 steps for Fact Forcing)."""
    return EditMethod(
        name=name,
        hparams=FTHParams,
        config_sections=("ft", name),
        needs_key_stats=False,
        window=window,
        tuned_field="linf_eps",
        steps_field="steps",
        forcing_steps=(25, 50),
        apply="locedit.editing.finetune:apply_finetune",
        changed_params=_finetuned,
        batched_fit="locedit.editing.grouped_finetune:finetune_group",
    )


#: Every editing method: the paper's (Sec. 5.2), in its order, then the later closed-form
#: editors on the same statistics, keys and z* (README, "Beyond the paper").
REGISTRY: dict[str, EditMethod] = {
    m.name: m
    for m in (
        _closed_form(
            "rome", RomeHParams, 1, "locedit.editing.rome:apply_rome",
            vstar_jobs="locedit.editing.rome:rome_vstar_jobs",
        ),
        _closed_form(
            "memit", MemitHParams, 5, "locedit.editing.memit:apply_memit", window_field="n_layers"
        ),
        _constrained_finetune("ft1", 1),
        _constrained_finetune("ft5", 5),
        _closed_form(
            "emmet",
            EmmetHParams,
            5,
            "locedit.editing.emmet:apply_emmet",
            window_field="n_layers",
            in_paper=False,
            extra_tuned_fields=("emmet_lambda",),
        ),
        _closed_form(
            "alphaedit",
            AlphaEditHParams,
            5,
            "locedit.editing.alphaedit:apply_alphaedit",
            window_field="n_layers",
            in_paper=False,
            extra_tuned_fields=("nullspace_threshold",),
        ),
    )
}

#: The paper's methods, in its order: the default of ``edit.methods``, ``locedit edit`` and the
#: benchmarks.
METHODS: tuple[str, ...] = tuple(name for name, m in REGISTRY.items() if m.in_paper)

#: Every registered method, in registry order (what ``edit.methods`` may name).
ALL_METHODS: tuple[str, ...] = tuple(REGISTRY)


def get_method(name: str) -> EditMethod:
    """The registry entry of ``name``, or an error listing the known methods."""
    if name not in REGISTRY:
        raise ValueError(f"unknown edit method {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def hparams_for(
    method: str,
    config: Mapping[str, Any] | None = None,
    problem: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> HParams:
    """Hyperparameters of ``method`` (see :meth:`EditMethod.hparams_from`)."""
    return get_method(method).hparams_from(config, problem, overrides)


def key_stats_methods(methods) -> list[str]:
    """Those of ``methods`` that need key statistics (a CovarianceStore)."""
    return [m for m in methods if get_method(m).needs_key_stats]
