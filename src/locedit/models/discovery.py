"""Find where a causal LM keeps its layers, MLP and attention by inspecting the loaded model.

The table in :mod:`locedit.models.architecture` documents the families it names and overrides
discovery for them; every other family is discovered here from the module tree and one short
forward pass (which module's output is which tensor), and every spec, whatever its source, is
checked numerically before heavy work (:func:`validate_spec`). Structures the experiment has no
principled meaning for (mixture-of-experts MLPs, encoder-decoder models) are refused.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from locedit.models.architecture import (
    ARCHITECTURES,
    ArchSpec,
    UnsupportedArchitectureError,
    text_config,
)
from locedit.models.tolerance import within

#: Fields of :class:`ArchSpec` a ``model.arch`` setting may override.
ARCH_FIELDS = tuple(f.name for f in fields(ArchSpec))
_REQUIRED = ("layers", "mlp", "mlp_down", "down_orientation", "attn", "embed", "final_norm")
_N_LAYERS_ATTRS = ("n_layer", "num_hidden_layers", "num_layers", "n_layers")
_EXPERT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_NORM = re.compile("norm", re.IGNORECASE)
_ATTENTION = re.compile("attn|attention", re.IGNORECASE)
#: Cross-attention (to an encoder the causal LM runs without): not the block's own mixer.
_CROSS = re.compile("cross|encoder", re.IGNORECASE)
_OVERRIDE_HINT = (
    "set model.arch.<field> (fields: layers, mlp, mlp_down, down_orientation, attn, embed, "
    "final_norm, mlp_post_norm; '{}' stands for the layer index) or add an ArchSpec entry to "
    "ARCHITECTURES in src/locedit/models/architecture.py"
)


_FLAT_MLP = (
    "the MLP output of {path} is not laid out [batch, position, width] (the block runs its MLP "
    "on flattened rows, as OPT does), and tracing and editing address positions in it"
)


class PositionRows(nn.Module):
    """A down-projection that its block calls on flattened ``[batch * position, width]`` rows
    (OPT), run on ``[batch, position, width]`` so that hooks on :attr:`linear` see positions.

    The block's pre-hook (see :func:`adapt_flat_rows`) notes each call's (batch, position)
    shape in :attr:`rows_shape`. Same weights, same arithmetic: only views change, so outputs
    are bit-identical to the unadapted block's.
    """

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        self.rows_shape: tuple[int, int] | None = None

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        shape = self.rows_shape
        if rows.dim() != 2 or shape is None or rows.shape[0] != shape[0] * shape[1]:
            return self.linear(rows)
        return self.linear(rows.view(*shape, rows.shape[-1])).reshape(rows.shape[0], -1)


def _note_rows(adapter: PositionRows, _block, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    adapter.rows_shape = (int(hidden.shape[0]), int(hidden.shape[1]))


def adapt_flat_rows(stack: nn.ModuleList, relative: str) -> str:
    """Wrap the down-projection at ``relative`` (a path inside each block) of every block in
    :class:`PositionRows`; returns the adapted relative path (``relative + ".linear"``).

    The one structural change locedit makes to a model, done once at discovery: parameter
    names gain ``.linear``; values, outputs and gradients are unchanged (tested).
    """
    parent_path, _, child = relative.rpartition(".")
    for block in stack:
        parent = block.get_submodule(parent_path) if parent_path else block
        down = getattr(parent, child)
        if isinstance(down, PositionRows):
            continue
        adapter = PositionRows(down)
        setattr(parent, child, adapter)
        block.register_forward_pre_hook(functools.partial(_note_rows, adapter), with_kwargs=True)
    return f"{relative}.linear"


#: Checks whose failure no path setting can fix (the spec has no field for the LM head).
_UNSETTABLE_CHECKS = ("unembedding",)


class ArchitectureCheckError(UnsupportedArchitectureError):
    """A spec that fails a numerical check on the loaded model (one line: which, how to fix)."""


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def _refuse(model: nn.Module, what: str, *, settable: bool = True) -> UnsupportedArchitectureError:
    """One line: what discovery could not find, and ``model.arch`` only where a path setting
    can describe the model (``settable``); structures the spec has no field for get none."""
    if settable:
        return UnsupportedArchitectureError(
            f"cannot find the structure of model_type {_model_type(model)!r}: {what}; "
            + _OVERRIDE_HINT
        )
    return UnsupportedArchitectureError(
        f"model_type {_model_type(model)!r} is not supported: {what} (no model.arch setting "
        "can describe it)"
    )


def _block_layout(block: nn.Module) -> tuple[tuple[str, str], ...]:
    return tuple((name, type(child).__name__) for name, child in block.named_children())


def refuse_mixed_blocks(model: nn.Module, layers: str, stack: nn.ModuleList) -> None:
    """Blocks that differ in their components (hybrids alternating attention with a recurrent
    or convolutional mixer) have no single ``{}`` path per component: refuse them."""
    layouts = [_block_layout(block) for block in stack]
    if len(set(layouts)) == 1:
        return
    other = next(i for i, layout in enumerate(layouts) if layout != layouts[0])
    differ = sorted(
        {name for name, _ in layouts[0]} ^ {name for name, _ in layouts[other]}
    ) or sorted({name for (name, kind) in set(layouts[0]) ^ set(layouts[other])})
    raise _refuse(
        model,
        f"its blocks differ in structure ({layers}.0 and {layers}.{other} differ in "
        f"{', '.join(differ)}, as in hybrids alternating attention with other mixers); tracing "
        "and editing address the same component in every layer",
        settable=False,
    )


def refuse_unsupported_structure(model: nn.Module) -> None:
    """Encoder-decoder and mixture-of-experts models, and LMs without a separate decoder
    stack, are out of scope: say so in one line."""
    config = getattr(model, "config", None)
    name = _model_type(model)
    # BartForCausalLM & co. clear is_encoder_decoder on their copy; the encoder width stays.
    encoder = any(getattr(config, a, None) for a in ("encoder_layers", "num_encoder_layers"))
    if getattr(config, "is_encoder_decoder", False) or encoder:
        raise UnsupportedArchitectureError(
            f"model_type {name!r} is an encoder-decoder model; locedit traces and edits "
            "decoder-only causal LMs (the experiment's layer l is a decoder block of one stack)"
        )
    experts = max((int(getattr(config, a, 0) or 0) for a in _EXPERT_ATTRS), default=0)
    routed = any(
        "expert" in type(m).__name__.lower() or "moe" in type(m).__name__.lower()
        for m in model.modules()
    )
    if experts > 1 or routed:
        raise UnsupportedArchitectureError(
            f"model_type {name!r} has mixture-of-experts MLPs; locedit does not support them "
            "(ROME/MEMIT edit one dense MLP down-projection per layer, and a routed MLP has no "
            "single one)"
        )
    if getattr(model, "base_model", None) is model:
        # e.g. MllamaForCausalLM: its base_model_prefix names no attribute, so base_model is
        # the LM itself and returns logits, where tracing and editing read the decoder
        # stack's last hidden state
        raise _refuse(
            model,
            f"{type(model).__name__}.base_model is the model itself (no attribute "
            f"{getattr(model, 'base_model_prefix', '')!r}), so the decoder stack's hidden "
            "states cannot be read",
            settable=False,
        )


def config_n_layers(model: nn.Module) -> tuple[str, int]:
    """(attribute, value) of the (text) config's layer count, preferring the stored attribute
    name."""
    config = text_config(model)
    stored = vars(config)
    for attr in _N_LAYERS_ATTRS:
        if isinstance(stored.get(attr), int):
            return attr, stored[attr]
    for attr in _N_LAYERS_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return attr, value
    raise _refuse(model, "its config has no layer count (num_hidden_layers)")


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal to :mod:`locedit.models.tolerance`'s relative bound (not ``1e-5 * (scale + 1)``,
    which a 1.4% error in values of order 1e-5 passes)."""
    if a is None or b is None or a.shape != b.shape:
        return False
    return within(a, b)


def _is_norm(module: nn.Module) -> bool:
    return bool(_NORM.search(type(module).__name__)) and not any(
        p.ndim > 1 for p in module.parameters()
    )


def _is_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and not isinstance(module, nn.Embedding)
        and not any(True for _ in module.children())
    )


def _probe_ids(model: nn.Module, length: int = 6) -> torch.Tensor:
    weight = model.get_input_embeddings().weight
    ids = (torch.arange(length, device=weight.device) * 7919 + 11).remainder(int(weight.shape[0]))
    return ids[None]


@dataclass
class _Record:
    order: int
    inputs: tuple
    output: object


def _recorded_forward(
    model: nn.Module, modules: Mapping[str, nn.Module], run: Callable[[], object]
) -> tuple[dict[str, _Record], object]:
    """Run ``run`` once recording each named module's first call (inputs, output, order)."""
    seen: dict[str, _Record] = {}
    handles = []

    def make(name: str):
        def hook(_module, inputs, output):
            if name not in seen:
                seen[name] = _Record(len(seen), inputs, output)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    return seen, result


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def discover_spec(model: nn.Module, *, adapt: bool = True) -> ArchSpec:
    """Derive an :class:`ArchSpec` from the module tree and one forward pass of ``model``.

    A block that runs its MLP on flattened rows (OPT) gets its down-projection wrapped in
    :class:`PositionRows` (``adapt``), after which the MLP is seen per position.
    """
    refuse_unsupported_structure(model)
    n_attr, n = config_n_layers(model)
    blocks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == n
        and n > 0
        and all(type(b) is type(module[0]) for b in module)
    ]
    if not blocks:
        mixed = next(
            (
                name
                for name, module in model.named_modules()
                if isinstance(module, nn.ModuleList) and len(module) == n > 0
            ),
            None,
        )
        if mixed is not None:
            kinds = sorted({type(b).__name__ for b in model.get_submodule(mixed)})
            raise _refuse(
                model,
                f"its blocks at {mixed} are of different classes ({', '.join(kinds)}: a hybrid "
                "of attention and other mixers); tracing and editing address the same "
                "component in every layer",
                settable=False,
            )
        raise _refuse(model, f"no nn.ModuleList of {n} identical blocks ({n_attr}={n})")
    layers, stack = max(
        blocks, key=lambda item: (sum(p.numel() for p in item[1].parameters()), -len(item[0]))
    )
    refuse_mixed_blocks(model, layers, stack)
    probe = n // 2
    block = stack[probe]
    prefix = f"{layers}.{probe}"

    def generic(path: str) -> str:
        return f"{layers}.{{}}{path[len(prefix) :]}"

    children = dict(block.named_children())
    attn_children = [
        name
        for name, child in children.items()
        if (_ATTENTION.search(name) or _ATTENTION.search(type(child).__name__))
        and not _is_norm(child)
        and any(_is_linear(m) for m in child.modules())
    ]
    attn_children = [
        c for c in attn_children if not _CROSS.search(c)
    ] or attn_children
    if not attn_children and not any(
        _ATTENTION.search(type(m).__name__) for m in block.modules()
    ):
        mixers = sorted({type(child).__name__ for child in children.values()} - {"Identity"})
        raise _refuse(
            model,
            f"its blocks have no attention ({', '.join(mixers)}: a recurrent or state-space "
            "model); the experiment's attn component and tracing need attention",
            settable=False,
        )
    if len(attn_children) != 1:
        raise _refuse(
            model, f"found {len(attn_children)} attention modules in a block, expected one"
        )
    attn_name = attn_children[0]

    embed = _module_path(model, model.get_input_embeddings())
    if embed is None:
        raise _refuse(model, "get_input_embeddings() is not a submodule of the model")

    linears = {
        f"{prefix}.{name}": module
        for name, module in block.named_modules()
        if name and _is_linear(module)
    }
    norms_in_block = {f"{prefix}.{name}": m for name, m in children.items() if _is_norm(m)}
    in_stack = {id(m) for m in stack.modules()}
    outer_norms = {
        name: m for name, m in model.named_modules() if _is_norm(m) and id(m) not in in_stack
    }
    watched = {
        **linears,
        **norms_in_block,
        **{f"{prefix}.{name}": child for name, child in children.items()},
        **{f"final:{name}": m for name, m in outer_norms.items()},
        "last_block": stack[-1],
    }
    ids = _probe_ids(model)
    seen, _ = _recorded_forward(model, watched, lambda: model.base_model(input_ids=ids))
    hidden = int(_first_tensor(seen["last_block"].output).shape[-1])

    attn_prefix = f"{prefix}.{attn_name}"
    outside_attn = [
        name for name in linears if name in seen and not name.startswith(attn_prefix + ".")
    ]
    to_hidden = [
        name for name in outside_attn if _first_tensor(seen[name].output).shape[-1] == hidden
    ]
    if not to_hidden:
        raise _refuse(model, "no linear map back to the hidden width outside attention")
    down = max(to_hidden, key=lambda name: seen[name].order)
    d_in = int(seen[down].inputs[0].shape[-1])
    orientation = _orientation(linears[down], seen[down], hidden, d_in)

    down_out = _first_tensor(seen[down].output)
    relative = down[len(prefix) + 1 :]
    container = f"{prefix}.{relative.split('.')[0]}"
    mlp = (
        container
        if container in seen and _same(_first_tensor(seen[container].output), down_out)
        else down
    )
    mlp_out = _first_tensor(seen[mlp].output)
    if mlp_out.shape != _first_tensor(seen["last_block"].output).shape:
        if adapt and mlp_out.dim() == 2:
            adapt_flat_rows(stack, relative)
            return discover_spec(model, adapt=False)
        raise _refuse(model, _FLAT_MLP.format(path=generic(mlp)))

    attn = attn_prefix
    attn_proj = [
        name
        for name in linears
        if name.startswith(attn_prefix + ".")
        and name in seen
        and _first_tensor(seen[name].output).shape[-1] == hidden
    ]
    if attn_proj:
        out_proj = max(attn_proj, key=lambda name: seen[name].order)
        if not _same(_first_tensor(seen[attn_prefix].output), _first_tensor(seen[out_proj].output)):
            attn = out_proj  # the module adds more than attention (Bloom adds the residual)

    post_norm = next(
        (
            name
            for name in norms_in_block
            if name in seen and seen[name].inputs and _same(seen[name].inputs[0], mlp_out)
        ),
        None,
    )
    last = _first_tensor(seen["last_block"].output)
    finals = [
        name[len("final:") :]
        for name in watched
        if name.startswith("final:")
        and name in seen
        and seen[name].inputs
        and _same(seen[name].inputs[0], last)
    ]
    if not finals:
        raise _refuse(
            model,
            "no norm module reads the last block's output (post-norm blocks, as BERT's, end "
            "without a final norm; a functional norm is no module)",
            settable=False,
        )
    if len(finals) != 1:
        raise _refuse(model, f"found {len(finals)} final norms after the last block, expected one")
    return ArchSpec(
        layers=layers,
        mlp=generic(mlp),
        mlp_down=generic(down),
        down_orientation=orientation,
        attn=generic(attn),
        embed=embed,
        final_norm=finals[0],
        n_layers_attr=n_attr,
        mlp_post_norm=generic(post_norm) if post_norm else None,
    )


def _orientation(module: nn.Module, record: _Record, hidden: int, d_in: int) -> str:
    """``out_in`` ([hidden, d_in], nn.Linear) or ``in_out`` ([d_in, hidden], Conv1D).

    Read from the weight's shape; a square weight is decided by which product reproduces the
    module's recorded output.
    """
    shape = tuple(module.weight.shape)
    if hidden != d_in:
        return "out_in" if shape == (hidden, d_in) else "in_out"
    x = record.inputs[0].double()
    bias = getattr(module, "bias", None)
    bias = 0.0 if bias is None else bias.double()
    out = _first_tensor(record.output)
    w = module.weight.double()
    return "out_in" if _same(x @ w.T + bias, out) else "in_out"


def spec_with_overrides(base: ArchSpec | None, overrides: Mapping[str, object]) -> ArchSpec:
    """``base`` with the ``model.arch`` settings applied (all required fields when no base)."""
    unknown = sorted(set(overrides) - set(ARCH_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown model.arch setting(s) {unknown}; known: {', '.join(ARCH_FIELDS)}"
        )
    if base is None:
        missing = [f for f in _REQUIRED if overrides.get(f) is None]
        if missing:
            raise ValueError(f"model.arch must set {', '.join(missing)} when discovery fails")
        return ArchSpec(**{k: v for k, v in overrides.items() if v is not None})
    return replace(base, **dict(overrides))


def choose_spec(
    model: nn.Module, overrides: Mapping[str, object] | None = None
) -> tuple[ArchSpec, str]:
    """(spec, source): ``model.arch`` settings over the table entry over discovery."""
    refuse_unsupported_structure(model)
    overrides = {k: v for k, v in (overrides or {}).items()}
    table = ARCHITECTURES.get(_model_type(model))
    if table is not None:
        base, source = table, "table"
    else:
        try:
            base, source = discover_spec(model), "discovered"
        except UnsupportedArchitectureError:
            if not overrides:
                raise
            base, source = None, "model.arch"
    if overrides:
        return spec_with_overrides(base, overrides), f"{source} + model.arch"
    return base, source


def attach_spec(model: nn.Module, spec: ArchSpec) -> None:
    """Make ``spec`` the one :func:`locedit.models.architecture.arch_spec` returns for ``model``."""
    object.__setattr__(model, "_locedit_arch", spec)


# --------------------------------------------------------------------------------------------
# Validation: the spec must mean on this model what the experiment assumes it means.


@dataclass(frozen=True)
class CheckResult:
    name: str
    detail: str


def validate_spec(model: nn.Module, spec: ArchSpec) -> list[CheckResult]:
    """Run the numerical checks; raise :class:`ArchitectureCheckError` at the first failure."""
    from locedit.models.scoring import unembed
    from locedit.models.snapshot import preserved_weights

    results: list[CheckResult] = []

    def fail(check: str, detail: str) -> ArchitectureCheckError:
        hint = _OVERRIDE_HINT if check not in _UNSETTABLE_CHECKS else (
            "no model.arch setting can change this: the spec has no field for it"
        )
        return ArchitectureCheckError(
            f"model_type {_model_type(model)!r} fails the architecture check '{check}' "
            f"({detail}); " + hint
        )

    def resolve(path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError as err:
            raise fail("paths", f"module {path!r} not found") from err

    _, n = config_n_layers(model)
    stack = resolve(spec.layers)
    if not isinstance(stack, nn.ModuleList) or len(stack) != n:
        raise fail("layers", f"{spec.layers} is not a list of {n} blocks")
    for layer in range(n):
        for path in (spec.mlp, spec.mlp_down, spec.attn, spec.mlp_post_norm):
            if path is not None:
                resolve(path.format(layer))
    resolve(spec.embed)
    final = resolve(spec.final_norm)
    results.append(CheckResult("layers", f"{n} blocks at {spec.layers}; every path resolves"))

    layer = n // 2
    mlp = resolve(spec.mlp.format(layer))
    down = resolve(spec.mlp_down.format(layer))
    attn = resolve(spec.attn.format(layer))
    post = resolve(spec.mlp_post_norm.format(layer)) if spec.mlp_post_norm else None
    watched = {"mlp": mlp, "down": down, "attn": attn, "last": stack[-1], "final": final}
    if post is not None:
        watched["post"] = post
    ids = _probe_ids(model)
    seen, out = _recorded_forward(model, watched, lambda: model(input_ids=ids))
    logits = out.logits
    mlp_out = _first_tensor(seen["mlp"].output)
    if not _same(mlp_out, _first_tensor(seen["down"].output)):
        raise fail("mlp-output", f"the output of {spec.mlp} is not that of {spec.mlp_down}")
    if post is not None and not _same(seen["post"].inputs[0], mlp_out):
        raise fail("mlp-post-norm", f"{spec.mlp_post_norm} does not read the MLP output")
    if mlp_out.shape != _first_tensor(seen["last"].output).shape:
        raise fail("mlp-layout", _FLAT_MLP.format(path=spec.mlp))
    results.append(CheckResult("mlp-output", "MLP hook = down-projection output"))
    attn_out = _first_tensor(seen["attn"].output)
    if attn_out is None or attn_out.shape[-1] != mlp_out.shape[-1]:
        raise fail("attn-output", f"{spec.attn} does not output hidden states")

    final_in = seen["final"].inputs[0] if seen["final"].inputs else None
    if not _same(final_in, _first_tensor(seen["last"].output)):
        raise fail("final-norm", f"{spec.final_norm} does not read the last block's output")
    if not _same(unembed(model, _first_tensor(seen["final"].output)).float(), logits.float()):
        raise fail(
            "unembedding",
            "logits differ from the output embedding of the final norm's output: the head "
            "transforms it further",
        )
    results.append(CheckResult("final-norm", "last block -> final norm -> unembedding = logits"))

    generator = torch.Generator(device="cpu").manual_seed(0)  # CPU: the same probe everywhere

    def replaced(_m, _i, output):
        hidden = _first_tensor(output)
        noise = torch.randn(hidden.shape, generator=generator, device="cpu").to(hidden)
        new = noise * (float(hidden.float().std()) + 1.0)
        return new if isinstance(output, torch.Tensor) else (new, *output[1:])

    for kind, module in (("mlp", mlp), ("attn", attn)):
        handle = module.register_forward_hook(replaced)
        try:
            with torch.no_grad():
                changed = model(input_ids=ids).logits
        finally:
            handle.remove()
        if not (changed - logits).abs().max() > 1e-6 * (float(logits.abs().max()) + 1.0):
            raise fail(
                f"{kind}-effect",
                f"replacing the output of {module_name(spec, kind, layer)} leaves the logits unchanged",
            )
    results.append(CheckResult("effect", "replacing the MLP or attention output changes logits"))

    # The last position's key and value (OPT's MLP runs on [batch * seq, width] rows).
    key = seen["down"].inputs[0].flatten(0, -2)[-1].double()
    value = _first_tensor(seen["down"].output).flatten(0, -2)[-1].double()
    wanted = torch.randn(
        value.shape, generator=generator, dtype=torch.float64, device="cpu"
    ).to(value.device)
    target = value + wanted * (float(value.norm()) / value.numel() ** 0.5 + 1.0)
    delta = torch.outer(target - value, key) / float(key @ key)
    if spec.down_orientation == "in_out":
        delta = delta.T
    if tuple(delta.shape) != tuple(down.weight.shape):
        raise fail(
            "rome-identity",
            f"orientation {spec.down_orientation} does not fit the weight shape "
            f"{tuple(down.weight.shape)} of {spec.mlp_down.format(layer)}",
        )
    name = spec.mlp_down.format(layer) + ".weight"
    with preserved_weights(model, [name]):
        with torch.no_grad():
            down.weight.add_(delta.to(down.weight.dtype))
        after, _ = _recorded_forward(model, {"down": down}, lambda: model(input_ids=ids))
        got = _first_tensor(after["down"].output).flatten(0, -2)[-1].double()
    # The realised change matches the wanted one (to the weight dtype's rounding).
    error = float((got - target).norm() / (target - value).norm())
    if not error < (1e-3 if down.weight.dtype in (torch.float32, torch.float64) else 0.1):
        raise fail(
            "rome-identity", f"(W + dW) k* != v* at {name} (orientation {spec.down_orientation})"
        )
    results.append(CheckResult("rome-identity", f"(W + dW) k* = v* at layer {layer}"))
    return results


def module_name(spec: ArchSpec, kind: str, layer: int) -> str:
    return (spec.mlp if kind == "mlp" else spec.attn).format(layer)


def prepare_architecture(
    model: nn.Module, overrides: Mapping[str, object] | None = None, *, check: bool = True
) -> tuple[ArchSpec, str, list[CheckResult]]:
    """Choose, attach and (by default) validate the spec of a freshly loaded model."""
    spec, source = choose_spec(model, overrides)
    attach_spec(model, spec)
    results = validate_spec(model, spec) if check else []
    return spec, source, results


__all__ = [
    "ArchitectureCheckError",
    "CheckResult",
    "PositionRows",
    "adapt_flat_rows",
    "attach_spec",
    "choose_spec",
    "discover_spec",
    "prepare_architecture",
    "refuse_unsupported_structure",
    "validate_spec",
]
