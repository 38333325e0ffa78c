"""Layer windows, grids, default layers and typed hyperparameters of the editing methods."""

from pathlib import Path

import pytest

from locedit.editing import (
    METHODS,
    FTHParams,
    MemitHParams,
    RomeHParams,
    default_layer,
    edit_layers,
    hparams_for,
    layer_grid,
    layers_needing_covariance,
)
from locedit.pipeline.common import compose_params

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_single_layer_methods_edit_only_their_layer():
    for method in ("rome", "ft1"):
        assert edit_layers(method, 7, 18) == [7]


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (9, [7, 8, 9, 10, 11]),
        (0, [0, 1, 2]),
        (1, [0, 1, 2, 3]),
        (16, [14, 15, 16, 17]),
        (17, [15, 16, 17]),
    ],
)
def test_five_layer_window_is_centred_and_clipped_like_tracing(layer, expected):
    # The paper's code: range(max(0, l - w // 2), min(L, l - (-w // 2))) for w = 5.
    assert edit_layers("memit", layer, 18) == expected
    assert edit_layers("ft5", layer, 18) == expected


def test_edit_layers_rejects_bad_input():
    with pytest.raises(IndexError):
        edit_layers("rome", 18, 18)
    with pytest.raises(ValueError, match="unknown edit method"):
        edit_layers("kn", 3, 18)


def test_paper_grids_are_the_papers_layers_minus_one():
    assert layer_grid(28) == [0, 4, 5, 8, 12, 16, 20, 24, 27]
    assert layer_grid(48) == [0, 4, 8, 12, 16, 17, 20, 24, 28, 32, 36, 40, 44, 47]
    # The paper's ROME default (its layer 6 / 18) is in its grid.
    assert default_layer("rome", 28) in layer_grid(28)
    assert default_layer("rome", 48) in layer_grid(48)


def test_other_depths_get_even_grid_plus_default_layer():
    # 5 points over 0..17: 0, 4.25, 8.5, 12.75, 17, rounded half up; default layer 5.
    assert layer_grid(18, 5) == [0, 4, 5, 9, 13, 17]
    assert layer_grid(30, 3, ["rome"]) == [0, 8, 15, 29]
    assert layer_grid(28, 4, paper_grids=False) == [0, 5, 9, 18, 27]


def test_default_layers_scale_from_the_originals():
    assert default_layer("rome", 28) == 5
    assert default_layer("memit", 48) == 17
    fraction = (5 / 27 + 17 / 47) / 2
    assert default_layer("ft1", 18) == int(fraction * 17 + 0.5) == 5
    assert default_layer("rome", 30) == int(fraction * 29 + 0.5) == 8


def test_covariance_layers_cover_rome_layers_and_memit_windows():
    assert layers_needing_covariance([0, 9], ["rome"], 18) == [0, 9]
    assert layers_needing_covariance([0, 9], ["memit", "ft5"], 18) == [0, 1, 2, 7, 8, 9, 10, 11]
    assert layers_needing_covariance([9], ["ft1", "ft5"], 18) == []


def test_hparams_from_composed_config_match_conf():
    params = compose_params(CONF)
    rome = hparams_for("rome", params)
    assert isinstance(rome, RomeHParams)
    assert rome.v_steps == params.method.rome.v_steps
    assert rome.kl_factor == params.method.rome.kl_factor
    assert rome.context_template_lengths == tuple(params.method.rome.context_template_lengths)
    memit = hparams_for("memit", params)
    assert isinstance(memit, MemitHParams)
    assert memit.mom2_weight == params.method.memit.mom2_weight
    ft1, ft5 = hparams_for("ft1", params), hparams_for("ft5", params)
    assert isinstance(ft1, FTHParams) and ft1.steps == params.method.ft.steps
    assert ft1.linf_eps == params.method.ft.linf_eps
    assert ft5.lr == params.method.ft.lr


def test_hparams_precedence_and_validation():
    config = {
        "method": {"ft": {"steps": 25, "linf_eps": 1e-4}, "ft5": {"linf_eps": 2e-5}},
        "problem": {"overrides": {"fact_forcing": {"ft5": {"steps": 50}}}},
        "seed": 3,
    }
    ft5 = hparams_for("ft5", config, problem="fact_forcing")
    assert (ft5.steps, ft5.linf_eps, ft5.seed) == (50, 2e-5, 3)
    assert hparams_for("ft1", config, problem="fact_forcing").steps == 25
    assert hparams_for("ft5", config, problem="fact_forcing", overrides={"steps": 7}).steps == 7
    assert hparams_for("rome", {"rome": {"kl_factor": 1}}).kl_factor == 1.0
    with pytest.raises(ValueError, match="unknown RomeHParams field"):
        hparams_for("rome", {"rome": {"kl_weight": 1.0}})
    assert hparams_for("rome").with_overrides(v_steps=25).v_steps == 25


def test_every_method_has_hparams():
    for method in METHODS:
        assert hparams_for(method).to_dict()
