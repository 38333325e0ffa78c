"""The intervention toolkit: every hook goes away and every replaced forward comes back exactly,
also when the body raises; recordings, edits, early stops and frozen layers compute what a
plain forward computes."""

from __future__ import annotations

import pytest
import torch

from locedit.models.hooks import (
    decoder_layers,
    edited_output,
    edited_outputs,
    frozen_layers,
    hidden_of,
    recorded,
    recorded_inputs,
    replaced_forward,
    run_until,
    window_layers,
)
from locedit.testing import tiny_model

IDS = torch.tensor([[5, 17, 2, 44, 9, 31]])


@pytest.fixture
def model():
    return tiny_model("gpt2", n_layers=4, seed=2).double()


def _hooks(model) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def _no_hooks(model) -> bool:
    """No hook left behind (transformers may add hooks of its own, e.g. to capture hidden
    states; the tests that ask for those compare with the count before)."""
    return _hooks(model) == _hooks(tiny_model("gpt2", n_layers=4, seed=2))


def _logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def test_recorded_reads_each_modules_first_output_and_input(model):
    layers = decoder_layers(model)
    with torch.no_grad():
        hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states
    before = _hooks(model)
    with recorded(dict(enumerate(layers))) as outs, recorded_inputs({2: layers[2]}) as ins:
        _logits(model)
        _logits(model, attention_mask=torch.zeros_like(IDS))  # a second call is not recorded
    # hidden_states[l + 1] is layer l's output (the last one after the final norm).
    for layer in range(3):
        assert torch.equal(hidden_of(outs[layer]), hidden[layer + 1].detach())
    assert torch.equal(ins[2], hidden[2].detach())
    assert _hooks(model) == before


def test_edited_output_changes_the_output_and_nothing_stays(model):
    clean = _logits(model)
    mlp = model.transformer.h[1].mlp
    with edited_output(mlp, torch.zeros_like):
        zeroed = _logits(model)
    by_hand = tiny_model("gpt2", n_layers=4, seed=2).double()
    with torch.no_grad():
        by_hand.transformer.h[1].mlp.c_proj.weight.zero_()
        by_hand.transformer.h[1].mlp.c_proj.bias.zero_()
    assert torch.equal(zeroed, _logits(by_hand))
    assert not torch.equal(zeroed, clean)
    assert torch.equal(_logits(model), clean)


def test_hooks_are_removed_when_the_body_raises(model):
    layers = decoder_layers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with (
            recorded({0: layers[0]}),
            recorded_inputs({1: layers[1]}),
            edited_outputs({2: layers[2]}, {2: lambda h: h + 1}),
        ):
            raise RuntimeError("boom")
    assert _no_hooks(model)


def test_run_until_stops_after_the_module(model):
    layers = decoder_layers(model)
    calls = []
    handles = [
        layer.register_forward_hook(lambda _m, _i, _o, j=j: calls.append(j))
        for j, layer in enumerate(layers)
    ]
    run_until(lambda: model(input_ids=IDS), layers[1])
    for handle in handles:
        handle.remove()
    assert calls == [0, 1]
    assert _no_hooks(model)


def test_replaced_forward_puts_back_an_instance_level_forward(model):
    layers = list(decoder_layers(model))
    wrapped = layers[0].forward  # a bound method, stored on the instance like accelerate does
    layers[0].forward = wrapped
    with pytest.raises(RuntimeError):
        with replaced_forward(layers[:2], [lambda *a, **k: None] * 2):
            assert layers[1].__dict__.get("forward") is not None
            raise RuntimeError
    assert layers[0].__dict__["forward"] is wrapped
    assert "forward" not in layers[1].__dict__


def test_frozen_layers_replay_gives_the_plain_forward(model):
    clean = _logits(model)
    layers = list(decoder_layers(model))
    seen = []
    with frozen_layers(model, lambda: model(input_ids=IDS), 2):
        # The frozen layers no longer compute: their weights do not matter inside the block.
        with torch.no_grad():
            saved = layers[0].mlp.c_fc.weight.clone()
            layers[0].mlp.c_fc.weight.zero_()
        handle = layers[1].register_forward_hook(lambda *_: seen.append(1))
        replayed = _logits(model)
        handle.remove()
        with torch.no_grad():
            layers[0].mlp.c_fc.weight.copy_(saved)
    assert torch.equal(replayed, clean)
    assert seen == [1]  # forward hooks on a frozen layer still run on the replayed output
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert torch.equal(_logits(model), clean)


@pytest.mark.parametrize(
    ("layer", "window", "total", "expected"),
    [
        (5, 5, 18, [3, 4, 5, 6, 7]),
        (5, 10, 18, list(range(0, 10))),
        (0, 5, 18, [0, 1, 2]),
        (17, 5, 18, [15, 16, 17]),
        (4, 1, 18, [4]),
        (3, 2, 18, [2, 3]),
    ],
)
def test_window_layers(layer, window, total, expected):
    assert list(window_layers(layer, window, total)) == expected
