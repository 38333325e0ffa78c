"""The MLP's residual gain: exactly 1 where the stream adds the MLP output, measured where a
family scales it (Granite's residual_multiplier)."""

import pytest
from transformers import AutoModelForCausalLM

from locedit.models.architecture import arch_spec
from locedit.models.residual import measure_residual_gain, residual_gain
from locedit.testing import ALL_FAMILIES, tiny_config, tiny_model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_families_add_the_mlp_output_as_it_is(family):
    model = tiny_model(family, n_layers=3)
    arch_spec(model)
    assert measure_residual_gain(model) == pytest.approx(1.0, abs=1e-5)
    assert residual_gain(model) == 1.0


@pytest.mark.parametrize("multiplier", [0.22, 1.7])
def test_a_scaled_residual_is_measured(multiplier):
    config = tiny_config("granite", n_layers=3)
    config.residual_multiplier = multiplier
    model = AutoModelForCausalLM.from_config(config).eval()
    assert residual_gain(model) == pytest.approx(multiplier, rel=1e-5)
    assert model.__dict__["_locedit_residual_gain"] == residual_gain(model)  # measured once
