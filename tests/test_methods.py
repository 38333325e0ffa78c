"""The method registry: each entry says what the paper says about its method, and a new method
is one entry (the editor, the layer helpers and the stats layers pick it up)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from locedit.editing import (
    METHODS,
    REGISTRY,
    EditRequest,
    FTHParams,
    MemitHParams,
    RomeHParams,
    edit_layers,
    edited,
    get_method,
    hparams_for,
    key_stats_methods,
    layers_needing_covariance,
)
from locedit.editing.types import EditCall, EditResult
from locedit.models.architecture import down_proj_name, down_proj_weight
from locedit.testing import tiny_model
from locedit.tuning import STEP_FIELDS, TUNED_FIELDS

PROMPT = "The Eiffel Tower is located in the city of"


def test_the_papers_four_methods():
    """Sec. 5.2 and App. A: what each method edits, needs and tunes."""
    assert METHODS == ("rome", "memit", "ft1", "ft5")
    expected = {
        "rome": (RomeHParams, True, 1, "kl_factor", "v_steps", (20, 25)),
        "memit": (MemitHParams, True, 5, "kl_factor", "v_steps", (20, 25)),
        "ft1": (FTHParams, False, 1, "linf_eps", "steps", (25, 50)),
        "ft5": (FTHParams, False, 5, "linf_eps", "steps", (25, 50)),
    }
    for name, (cls, stats, window, tuned, steps, forcing) in expected.items():
        m = get_method(name)
        assert (m.hparams, m.needs_key_stats, m.window) == (cls, stats, window)
        assert (m.tuned_field, m.steps_field, m.forcing_steps) == (tuned, steps, forcing)
        assert TUNED_FIELDS[name] == tuned and STEP_FIELDS[name] == steps
    assert key_stats_methods(["ft1", "memit", "ft5", "rome"]) == ["memit", "rome"]
    with pytest.raises(ValueError, match="unknown edit method 'kn'"):
        get_method("kn")


def test_memit_window_follows_its_hparams():
    hp = hparams_for("memit", overrides={"n_layers": 3})
    assert get_method("memit").layers(9, 18, hp) == [8, 9, 10]
    assert get_method("memit").layers(9, 18) == [7, 8, 9, 10, 11]
    assert get_method("rome").layers(9, 18, hparams_for("rome")) == [9]


def test_config_sections_refine_in_order():
    config = {"method": {"ft": {"steps": 7, "linf_eps": 1e-4}, "ft5": {"steps": 9}}, "seed": 3}
    ft5, ft1 = hparams_for("ft5", config), hparams_for("ft1", config)
    assert (ft5.steps, ft5.linf_eps, ft5.seed) == (9, 1e-4, 3)
    assert (ft1.steps, ft1.linf_eps) == (7, 1e-4)


def _shift_bias(edit: EditCall) -> EditResult:
    """A toy method: add ``hparams.amount`` to the down-projection weights of its layers."""
    with torch.no_grad():
        for j in edit.layers:
            down_proj_weight(edit.model, j).add_(edit.hparams.amount)
    return EditResult(method=edit.method, layer=edit.layer, layers=list(edit.layers))


@dataclasses.dataclass(frozen=True)
class ShiftHParams:
    amount: float = 0.5
    seed: int = 0


def test_a_new_method_is_one_registry_entry(monkeypatch, tok):
    shift = dataclasses.replace(
        get_method("ft5"),
        name="shift3",
        hparams=ShiftHParams,
        config_sections=("shift3",),
        window=3,
        needs_key_stats=True,
        apply=_shift_bias,
        changed_params=lambda model, layers, _hp: [down_proj_name(model, j) for j in layers],
    )
    monkeypatch.setitem(REGISTRY, "shift3", shift)
    model = tiny_model("gpt2", n_layers=4)
    before = {j: down_proj_weight(model, j).detach().clone() for j in range(4)}
    hp = hparams_for("shift3", {"method": {"shift3": {"amount": 0.25}}})
    assert hp == ShiftHParams(amount=0.25)
    assert edit_layers("shift3", 0, 4) == [0, 1]
    assert layers_needing_covariance([3], ["shift3", "ft1"], 4) == [2, 3]
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    # No context templates: the toy method's hparams have none, so no covariance store needed.
    monkeypatch.setattr("locedit.editing.editor.context_templates", lambda *a: ["{}"])
    with edited(model, tok, "shift3", request, 2, hp) as result:
        assert result.method == "shift3" and result.layers == [1, 2, 3]
        assert sorted(result.changed) == [down_proj_name(model, j) for j in (1, 2, 3)]
        assert torch.equal(down_proj_weight(model, 1), before[1] + 0.25)
    for j in range(4):
        assert torch.equal(down_proj_weight(model, j), before[j])


def test_per_model_defaults_sit_between_the_method_group_and_the_problem():
    config = {
        "model": {"name": "m"},
        "method": {
            "ft": {"linf_eps": 1e-4, "steps": 25},
            "per_model": {"m": {"ft": {"linf_reference_d_mlp": 16384, "steps": 30}}, "other": {"ft": {"steps": 99}}},
        },
        "problem": {"overrides": {"fact_forcing": {"ft1": {"steps": 50}}}},
    }
    hp = hparams_for("ft1", config)
    assert (hp.linf_reference_d_mlp, hp.steps, hp.linf_eps) == (16384, 30, 1e-4)
    assert hparams_for("ft1", config, problem="fact_forcing").steps == 50
    other = {**config, "model": {"name": "gpt-j"}}
    assert hparams_for("ft1", other).linf_reference_d_mlp is None
