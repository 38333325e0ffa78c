"""How the MLP output joins the residual stream: its gain.

MEMIT and the editors built on its spread (EMMET, AlphaEdit) split the wanted change of the
residual stream z into shares r_i and ask each layer's MLP to add r_i (Meng et al. 2022b,
Sec. 4.3): they assume the MLP output is added to the stream as it is. Some families scale it
first (Granite's ``residual_multiplier``, about 0.22 in released checkpoints), so an MLP change
of r_i moves z by gain x r_i only. The gain is measured, not read from a config field: add a
small vector to the MLP output (after the post-MLP norm where there is one) at one position and
see how much of it reaches the block's output there.
"""

from __future__ import annotations

import torch
from torch import nn

from locedit.models.architecture import arch_spec, component_module, get_module, n_layers
from locedit.models.hooks import edited_output, hidden_of, recorded

#: Gains within this distance of 1 are exactly 1 (the stream adds the MLP output as it is):
#: the measurement's float rounding must not perturb the edits of ordinary architectures.
UNIT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_TOLERANCE = 2e-2


class NonAdditiveResidualError(ValueError):
    """The block output does not move along the vector added to the MLP output."""


def _contribution(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is what the MLP adds to the stream (post-norm if any)."""
    post = arch_spec(model).mlp_post_norm
    if post is not None:
        return get_module(model, post.format(layer))
    return component_module(model, "mlp", layer)


def measure_residual_gain(model: nn.Module, layer: int | None = None) -> float:
    """gain = <d block_out, d> / <d, d> for a vector d added to the MLP's contribution at the
    last position of ``layer`` (default: the middle layer). Raises
    :class:`NonAdditiveResidualError` when the change is not a multiple of d (to rounding)."""
    layer = n_layers(model) // 2 if layer is None else layer
    block = component_module(model, "resid", layer)
    source = _contribution(model, layer)
    weight = model.get_input_embeddings().weight
    ids = (torch.arange(6, device=weight.device) * 7919 + 11).remainder(int(weight.shape[0]))[None]

    def block_output() -> torch.Tensor:
        with recorded({"block": block}) as seen, torch.no_grad():
            model(input_ids=ids)
        return hidden_of(seen["block"])[0, -1].double()

    before = block_output()
    generator = torch.Generator(device="cpu").manual_seed(0)
    direction = torch.randn(before.shape, generator=generator, dtype=torch.float64, device="cpu")
    delta = direction * (0.01 * float(before.norm()) / float(direction.norm()) + 1e-3)
    delta = delta.to(device=before.device)

    def add(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[..., -1, :] += delta.to(hidden.dtype)
        return hidden

    with edited_output(source, add):
        after = block_output()
    change = after - before
    gain = float(change @ delta) / float(delta @ delta)
    misfit = float((change - gain * delta).norm()) / max(float(change.norm()), 1e-300)
    tolerance = UNIT_TOLERANCE.get(weight.dtype, _HALF_TOLERANCE)
    if not misfit < max(100 * tolerance, 0.05):
        raise NonAdditiveResidualError(
            f"adding a vector to the MLP output of layer {layer} moves the block output along "
            f"another direction (misfit {misfit:.2e}); MEMIT-style edits assume it is added"
        )
    return gain


def residual_gain(model: nn.Module) -> float:
    """The MLP's residual gain of ``model``, measured once per model object; exactly 1.0 when
    the measurement is within rounding of 1 (see :data:`UNIT_TOLERANCE`)."""
    cached = model.__dict__.get("_locedit_residual_gain")
    if cached is None:
        gain = measure_residual_gain(model)
        dtype = model.get_input_embeddings().weight.dtype
        if abs(gain - 1.0) < UNIT_TOLERANCE.get(dtype, _HALF_TOLERANCE):
            gain = 1.0
        object.__setattr__(model, "_locedit_residual_gain", gain)
        cached = gain
    return float(cached)
