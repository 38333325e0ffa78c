"""Weights changed inside a preserved block come back bit-identical, even after an error."""

from __future__ import annotations

import pytest
import torch

from locedit.models.snapshot import WeightSnapshot, model_fingerprint, preserved_weights
from locedit.testing import tiny_model


def _names(model):
    return [n for n, _ in model.named_parameters() if ".mlp." in n]


def test_restore_is_bit_identical_after_exception():
    model = tiny_model("gpt2", n_layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_weights(model, _names(model)) as snap:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if ".mlp." in name:
                        param.add_(torch.randn_like(param))
            assert snap.changed()
            raise RuntimeError("boom")
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_changed_lists_exactly_the_modified_parameters():
    model = tiny_model("llama", n_layers=2)
    names = _names(model)
    snap = WeightSnapshot(model, names)
    with torch.no_grad():
        dict(model.named_parameters())[names[0]][0, 0] += 1.0
    assert snap.changed() == [names[0]]
    snap.restore()
    assert snap.changed() == []


def test_fingerprint_sees_a_single_changed_weight():
    model = tiny_model("gpt2", n_layers=2)
    before = model_fingerprint(model)
    with preserved_weights(model, ["transformer.h.1.mlp.c_proj.weight"]):
        with torch.no_grad():
            model.transformer.h[1].mlp.c_proj.weight[3, 5] += 1e-3
        assert model_fingerprint(model) != before
    assert model_fingerprint(model) == before


def test_fingerprint_sees_the_last_bit_and_the_dtype():
    model = tiny_model("llama", n_layers=1)
    before = model_fingerprint(model)
    weight = model.model.layers[0].mlp.down_proj.weight
    with preserved_weights(model, ["model.layers.0.mlp.down_proj.weight"]):
        with torch.no_grad():  # flip the lowest mantissa bit of one value: sums would miss it
            weight.view(torch.int32)[-1, -1] ^= 1
        assert model_fingerprint(model) != before
    assert model_fingerprint(model) == before
    assert model_fingerprint(model.to(torch.bfloat16)) not in (before, "")
