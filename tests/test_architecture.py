"""The architecture table resolves every path on each family and hooks see the right shapes."""

from __future__ import annotations

import pytest
import torch

from locedit.models.architecture import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    arch_spec,
    as_out_in,
    component_module,
    down_proj_weight,
    embedding_module,
    get_module,
    mlp_param_names,
    n_layers,
)
from locedit.models.discovery import discover_spec
from locedit.testing import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_path_resolves_and_mlp_hook_sees_d_model(family):
    model = tiny_model(family, n_layers=3)
    spec = arch_spec(model)
    assert n_layers(model) == 3
    get_module(model, spec.final_norm)
    assert embedding_module(model).weight.shape[1] == 64
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    seen = {}
    handles = [
        component_module(model, "mlp", layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out.shape)
        )
        for layer in range(3)
    ]
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {layer: torch.Size([1, 5, 64]) for layer in range(3)}


@pytest.mark.parametrize("family", FAMILIES)
def test_down_projection_orientation_maps_keys_to_mlp_output(family):
    """W k = mlp output for the key captured at the down-projection input (any orientation)."""
    model = tiny_model(family, n_layers=2)
    spec = arch_spec(model)
    down = get_module(model, spec.mlp_down.format(1))
    captured = {}
    handle = down.register_forward_hook(
        lambda _m, inputs, out: captured.update(key=inputs[0].detach(), out=out.detach())
    )
    try:
        model(torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    weight = as_out_in(model, down_proj_weight(model, 1))
    bias = getattr(down, "bias", None)
    expected = captured["key"] @ weight.T + (bias if bias is not None else 0)
    torch.testing.assert_close(expected, captured["out"], rtol=1e-5, atol=1e-5)
    assert weight.shape[0] == 64


def test_mlp_param_names_belong_to_the_layer():
    model = tiny_model("llama", n_layers=3)
    names = mlp_param_names(model, 2)
    assert names and all(name.startswith("model.layers.2.mlp.") for name in names)


def test_layer_out_of_range_is_a_clear_error():
    model = tiny_model("gpt2", n_layers=2)
    with pytest.raises(IndexError, match="layers 0..1"):
        component_module(model, "mlp", 5)


def test_an_unfindable_structure_is_one_line_saying_how_to_override():
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"model_type": "mystery"})()
    with pytest.raises(UnsupportedArchitectureError) as err:
        arch_spec(model)
    message = str(err.value)
    assert "mystery" in message and "model.arch" in message and "ARCHITECTURES" in message
    assert "\n" not in message


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_discovery_reproduces_every_table_entry(family):
    """The table overrides discovery; on the families it names both must say the same."""
    assert discover_spec(tiny_model(family, n_layers=2)) == ARCHITECTURES[family]


def test_table_entry_overrides_and_is_used_without_a_forward_pass():
    model = tiny_model("gemma3_text", n_layers=2)
    assert arch_spec(model) is ARCHITECTURES["gemma3_text"]


def test_table_covers_the_required_families():
    assert {"gpt2", "gptj", "gpt_neox", "llama", "gemma3_text"} <= set(ARCHITECTURES)
