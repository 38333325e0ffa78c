"""Where things live in a transformer: the spec every component lookup goes through.

Code above ``locedit.models`` speaks of "layer l, MLP output" and asks :func:`arch_spec` for
the module; it never branches on model names. Families not in :data:`ARCHITECTURES` are
discovered by inspection (:mod:`locedit.models.discovery`); the table documents the families
it names and overrides discovery for them (a test keeps both in agreement).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

#: How a down-projection stores its weight: ``out_in`` is ``nn.Linear`` ([d_model, d_mlp]),
#: ``in_out`` is GPT-2's ``Conv1D`` ([d_mlp, d_model]).
Orientation = Literal["out_in", "in_out"]
#: Components that tracing and zeroing can patch.
Component = Literal["mlp", "attn", "resid"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family; ``{}`` stands for the layer index."""

    layers: str
    mlp: str
    mlp_down: str
    down_orientation: Orientation
    attn: str
    embed: str
    final_norm: str
    n_layers_attr: str = "num_hidden_layers"
    #: RMSNorm applied to the MLP output before it joins the residual stream (Gemma 2/3's
    #: ``post_feedforward_layernorm``); ``None`` where the MLP output is added as it is.
    mlp_post_norm: str | None = None

    def layer(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def component(self, kind: Component, index: int) -> str:
        """Module whose output is the named component of layer ``index``.

        ``resid`` is the whole block: its output is the residual stream after layer ``index``.
        """
        if kind == "mlp":
            return self.mlp.format(index)
        if kind == "attn":
            return self.attn.format(index)
        if kind == "resid":
            return self.layer(index)
        raise ValueError(f"unknown component {kind!r}; expected one of mlp, attn, resid")


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    mlp="model.layers.{}.mlp",
    mlp_down="model.layers.{}.mlp.down_proj",
    down_orientation="out_in",
    attn="model.layers.{}.self_attn",
    embed="model.embed_tokens",
    final_norm="model.norm",
)

_GEMMA_POST_NORM = replace(_LLAMA_LIKE, mlp_post_norm="model.layers.{}.post_feedforward_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h",
        mlp="transformer.h.{}.mlp",
        mlp_down="transformer.h.{}.mlp.c_proj",
        down_orientation="in_out",
        attn="transformer.h.{}.attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        n_layers_attr="n_layer",
    ),
    "gptj": ArchSpec(
        layers="transformer.h",
        mlp="transformer.h.{}.mlp",
        mlp_down="transformer.h.{}.mlp.fc_out",
        down_orientation="out_in",
        attn="transformer.h.{}.attn",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        n_layers_attr="n_layer",
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_down="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        down_orientation="out_in",
        attn="gpt_neox.layers.{}.attention",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA_POST_NORM,
    "gemma3_text": _GEMMA_POST_NORM,
}


class UnsupportedArchitectureError(ValueError):
    """A model whose structure locedit cannot find or does not support (one line says why)."""


def arch_spec(model: nn.Module) -> ArchSpec:
    """The spec of ``model``: the one attached at load time (``model.arch`` settings, table
    entry or discovery, validated), else its table entry, else discovered from the model.
    """
    attached = model.__dict__.get("_locedit_arch")
    if attached is not None:
        return attached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if getattr(model, "config", None) is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type {model_type!r}) is not a Hugging Face model "
            "with a config; locedit reads the layer count and structure from it"
        )
    from locedit.models.discovery import attach_spec, discover_spec

    spec = discover_spec(model)
    attach_spec(model, spec)
    return spec


def block_returns_tuple(model: nn.Module) -> bool:
    """Whether a decoder block returns ``(hidden, ...)`` (Bloom, Falcon) rather than ``hidden``.

    Code that stands in for a block (tracing's call recorder) must answer in the same form.
    """
    known = model.__dict__.get("_locedit_block_tuple")
    if known is None:
        seen: list[bool] = []
        first = get_module(model, arch_spec(model).layer(0))
        handle = first.register_forward_hook(
            lambda _m, _i, out: seen.append(isinstance(out, tuple))
        )
        try:
            with torch.no_grad():
                device = model.get_input_embeddings().weight.device
                model.base_model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
        finally:
            handle.remove()
        known = bool(seen[0])
        object.__setattr__(model, "_locedit_block_tuple", known)
    return known


def text_config(model: nn.Module):
    """The config of the text decoder locedit traces and edits: the model's own for a text
    LM, its ``text_config`` for a multimodal wrapper (Gemma-3 4B and larger load as
    ``Gemma3ForConditionalGeneration``), whose depth, width, vocabulary and logit soft-cap
    live there."""
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def n_layers(model: nn.Module) -> int:
    spec = arch_spec(model)
    config = text_config(model)
    value = getattr(config, spec.n_layers_attr, None)
    if value is None:
        value = config.num_hidden_layers
    return int(value)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted module path, with an error that names the path that failed."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"module {path!r} not found in {type(model).__name__}; the architecture table "
            "entry for this family does not match the model"
        ) from err


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a layer index against the model's depth."""
    total = n_layers(model)
    if not 0 <= layer < total:
        raise IndexError(f"layer {layer} is out of range: the model has layers 0..{total - 1}")
    return layer


def component_module(model: nn.Module, kind: Component, layer: int) -> nn.Module:
    return get_module(model, arch_spec(model).component(kind, check_layer(model, layer)))


def component_name(model: nn.Module, kind: Component, layer: int) -> str:
    return arch_spec(model).component(kind, check_layer(model, layer))


def down_proj_name(model: nn.Module, layer: int) -> str:
    """Parameter name of the MLP down-projection weight at ``layer``."""
    return arch_spec(model).mlp_down.format(check_layer(model, layer)) + ".weight"


def down_proj_weight(model: nn.Module, layer: int) -> nn.Parameter:
    spec = arch_spec(model)
    return get_module(model, spec.mlp_down.format(check_layer(model, layer))).weight


def as_out_in(model: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """View a down-projection weight as [d_model, d_mlp] whatever the storage orientation."""
    return weight.T if arch_spec(model).down_orientation == "in_out" else weight


def from_out_in(model: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`as_out_in`: bring a [d_model, d_mlp] update into storage layout."""
    return delta.T if arch_spec(model).down_orientation == "in_out" else delta


def mlp_param_names(model: nn.Module, layer: int) -> list[str]:
    """Every parameter of the MLP block at ``layer`` (what constrained finetuning trains)."""
    prefix = arch_spec(model).mlp.format(check_layer(model, layer))
    module = get_module(model, prefix)
    return [f"{prefix}.{name}" for name, _ in module.named_parameters()]


def embedding_module(model: nn.Module) -> nn.Module:
    return get_module(model, arch_spec(model).embed)
