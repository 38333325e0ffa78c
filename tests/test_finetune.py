"""Constrained finetuning: the L-infinity ball holds exactly, only the requested layers move,
p(target) moves in the problem's direction, and Lightning leaves nothing behind."""

import os

import pytest
import torch

from locedit.editing import EditRequest, edited, hparams_for
from locedit.editing.finetune import finetuned_param_names, linf_bounds
from locedit.models.architecture import mlp_param_names
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import encode_prompt, encode_target
from locedit.testing import editable_tiny_model, gpt2_tokenizer, top_word

PROMPT = "My favourite place is the Eiffel Tower"


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model():
    return editable_tiny_model("gpt2", n_layers=6)


def probability(model, tok, target):
    ids = encode_prompt(tok, PROMPT, "Eiffel Tower").input_ids
    return target_log_probs(model, [ids], [encode_target(tok, PROMPT, target)]).exp().item()


@pytest.mark.parametrize(("method", "layers"), [("ft1", [2]), ("ft5", [0, 1, 2, 3, 4])])
def test_ft_stays_in_the_ball_and_raises_target(method, layers, model, tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eps = 1e-2
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = probability(model, tok, "Rome")
    hp = hparams_for(method, overrides={"linf_eps": eps})
    with edited(model, tok, method, EditRequest(PROMPT, "Eiffel Tower", "Rome"), 2, hp) as result:
        after = probability(model, tok, "Rome")
        expected = {
            f"transformer.h.{layer}.mlp.c_proj.{kind}"
            for layer in layers
            for kind in ("weight", "bias")
        }
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, originals[n])}
        assert changed == expected == set(result.changed)
        worst = max(
            float((dict(model.named_parameters())[n].double() - originals[n].double()).abs().max())
            for n in changed
        )
        assert worst <= eps  # exactly, in float64
        assert worst > 0.9 * eps  # and the optimiser actually used the ball
        assert result.diagnostics["max_abs_change"] == worst
        assert not model.training
    assert after > 3 * before
    assert os.listdir(tmp_path) == []  # no lightning_logs, no checkpoints
    assert all(not p.requires_grad for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name])


def test_ft_minimise_lowers_target(model, tok):
    word = top_word(model, tok, PROMPT)
    before = probability(model, tok, word)
    hp = hparams_for("ft1", overrides={"linf_eps": 1e-2})
    with edited(
        model, tok, "ft1", EditRequest(PROMPT, "Eiffel Tower", word, "minimize"), 2, hp
    ) as result:
        after = probability(model, tok, word)
    assert after < before / 2
    assert result.diagnostics["ft_steps"] == hp.steps  # no early stop when minimising


def test_ft_mlp_option_trains_every_mlp_parameter(model, tok):
    hp = hparams_for("ft1", overrides={"linf_eps": 1e-2, "params": "mlp", "steps": 3})
    with edited(model, tok, "ft1", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 1, hp) as result:
        assert set(result.changed) == set(mlp_param_names(model, 1))
    assert finetuned_param_names(model, [1]) == [
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.h.1.mlp.c_proj.bias",
    ]


def test_linf_bounds_are_exact_in_float64():
    generator = torch.Generator().manual_seed(0)
    weights = torch.cat(
        [torch.randn(10000, generator=generator) * 10, torch.tensor([1.0, -1.0, 0.0, 3e-5, 1e8])]
    )
    for eps in (1e-4, 5e-5, 2e-5, 1e-5):
        lo, hi = linf_bounds(weights, eps)
        exact = weights.double()
        assert (
            float((hi.double() - exact).max()) <= eps and float((exact - lo.double()).max()) <= eps
        )
        # One representable step further out would leave the ball: the bounds are tight.
        beyond_hi = torch.nextafter(hi, torch.full_like(hi, float("inf"))).double() - exact
        beyond_lo = exact - torch.nextafter(lo, torch.full_like(lo, float("-inf"))).double()
        moved = (hi != weights) & (lo != weights)
        assert bool((beyond_hi[moved] > eps).all()) and bool((beyond_lo[moved] > eps).all())


def test_linf_radius_scales_with_the_key_width(model, tok, tmp_path, monkeypatch):
    """linf_reference_d_mlp w: the ball's radius is linf_eps x w / d_mlp (GPT-J's radii carried
    to a narrower model); unset, linf_eps is used as given."""
    from locedit.editing.finetune import d_mlp, effective_linf_eps

    monkeypatch.chdir(tmp_path)
    width = int(dict(model.named_parameters())["transformer.h.2.mlp.c_proj.weight"].shape[0])
    assert d_mlp(model) == width  # GPT-2's Conv1D stores [d_mlp, d_model]
    hp = hparams_for("ft1", overrides={"linf_eps": 1e-3, "linf_reference_d_mlp": 4 * width})
    assert effective_linf_eps(hp, width) == pytest.approx(4e-3)
    assert effective_linf_eps(hparams_for("ft1"), width) == 1e-4
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    with edited(model, tok, "ft1", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 2, hp) as result:
        name = "transformer.h.2.mlp.c_proj.weight"
        worst = float((dict(model.named_parameters())[name].double() - originals[name].double()).abs().max())
    assert 0.9 * 4e-3 < worst <= 4e-3
    assert result.diagnostics["linf_eps"] == pytest.approx(4e-3)
