"""ROME: W' k* + b = v* per architecture, rank one, the key policies, and that it edits."""

import math

import numpy as np
import pytest
import torch

from locedit.editing import CorpusSpec, CovarianceStore, EditRequest, edited, hparams_for
from locedit.models.architecture import arch_spec, down_proj_weight, get_module
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import encode_prompt, encode_target
from locedit.testing import editable_tiny_model, tiny_model, top_word

FAST = {"n_context_templates": 2, "context_template_lengths": (4,), "v_steps": 5}
PROMPT = "The Eiffel Tower is located in the city of"


def key_and_value(model, tok, text, subject, layer):
    """Down-projection input and output at the subject's last token, from a plain forward."""
    enc = encode_prompt(tok, text, subject)
    module = get_module(model, arch_spec(model).mlp_down.format(layer))
    seen = {}

    def hook(_m, inputs, output):
        seen["k"] = inputs[0][0, enc.last_subject_index].detach().double()
        seen["v"] = output[0, enc.last_subject_index].detach().double()

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.tensor([enc.input_ids]))
    handle.remove()
    return seen["k"], seen["v"]


def apply_down_proj(model, weight, bias, key):
    """W k + b by hand, in each family's storage orientation."""
    w = weight.detach().double().numpy()
    out = key.numpy() @ w if arch_spec(model).down_orientation == "in_out" else w @ key.numpy()
    return out + (bias.detach().double().numpy() if bias is not None else 0.0)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama", "gemma3_text"])
def test_edited_weight_maps_prompt_key_to_v_star(family, tok, store):
    model = tiny_model(family, n_layers=4)
    layer = 1
    original = down_proj_weight(model, layer).detach().clone()
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    with edited(
        model, tok, "rome", request, layer, hparams_for("rome", overrides=FAST), store
    ) as result:
        weight = down_proj_weight(model, layer)
        bias = get_module(model, arch_spec(model).mlp_down.format(layer)).bias
        k_star, v_edited = key_and_value(model, tok, PROMPT, "Eiffel Tower", layer)
        v_star = result.tensors["v_star"].double().numpy()
        np.testing.assert_allclose(
            apply_down_proj(model, weight, bias, k_star), v_star, rtol=1e-4, atol=1e-5
        )
        # The edited model's own forward produces v* at the subject's last token.
        np.testing.assert_allclose(v_edited.numpy(), v_star, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            k_star.numpy(), result.tensors["k_prompt"].numpy(), rtol=1e-5, atol=1e-6
        )
        update = (weight.detach() - original).double()
        singular = torch.linalg.svdvals(update)
        assert singular[0] > 0 and singular[1] / singular[0] < 1e-5  # rank one
        assert result.changed == [arch_spec(model).mlp_down.format(layer) + ".weight"]
        assert result.diagnostics["update_norm_ratio"] == pytest.approx(
            float(update.norm() / original.double().norm()), rel=1e-4
        )
    assert torch.equal(down_proj_weight(model, layer), original)


def test_key_is_the_template_average_and_u_solves_the_covariance(tok, store):
    model = tiny_model("llama", n_layers=4)
    layer = 2
    hp = hparams_for("rome", overrides=FAST)
    templates = store.context_templates(
        model, tok, hp.context_template_lengths, hp.n_context_templates, hp.seed
    )
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    with edited(model, tok, "rome", request, layer, hp, store) as result:
        pass
    keys = [
        key_and_value(model, tok, t.replace("{}", PROMPT), "Eiffel Tower", layer)[0]
        for t in templates
    ]
    k_avg = torch.stack(keys).mean(0).numpy()
    np.testing.assert_allclose(result.tensors["k_avg"].numpy(), k_avg, rtol=1e-5, atol=1e-6)
    u = np.linalg.solve(store.get(model, layer).numpy(), k_avg)
    u /= np.linalg.norm(u)
    np.testing.assert_allclose(result.tensors["u"].numpy(), u, rtol=1e-4, atol=1e-6)
    k_prompt = key_and_value(model, tok, PROMPT, "Eiffel Tower", layer)[0].numpy()
    assert result.diagnostics["division_factor"] == pytest.approx(float(k_prompt @ u), rel=1e-4)
    assert result.diagnostics["division_factor_avg_key"] == pytest.approx(
        float(k_avg @ u), rel=1e-4
    )


def test_first_token_subject_and_consistent_key_policy(tok, store):
    # GPT-2 adds no BOS: the subject starts at position 0 of the bare prompt, while every
    # context template puts a space before it, so the prompt-only key differs from the average.
    model = tiny_model("gpt2", n_layers=4)
    prompt = "Eiffel Tower is located in the city of"
    assert encode_prompt(tok, prompt, "Eiffel Tower").subject_start == 0
    request = EditRequest(prompt, "Eiffel Tower", "Rome")
    original = edited_diag = None
    for policy in ("original", "consistent"):
        hp = hparams_for("rome", overrides={**FAST, "key_policy": policy})
        with edited(model, tok, "rome", request, 1, hp, store) as result:
            weight = down_proj_weight(model, 1)
            bias = model.transformer.h[1].mlp.c_proj.bias
            k_star = result.tensors["k_avg" if policy == "consistent" else "k_prompt"].double()
            np.testing.assert_allclose(
                apply_down_proj(model, weight, bias, k_star),
                result.tensors["v_star"].double().numpy(),
                rtol=1e-4,
                atol=1e-5,
            )
        diag = result.diagnostics
        assert all(np.isfinite(v) for v in diag.values())
        ratio = diag["division_ratio"]
        assert ("extreme_division_factor" in result.flags) == (not 0.1 <= ratio <= 10.0)
        if policy == "original":
            original = ratio
            assert ratio == pytest.approx(diag["division_factor"] / diag["division_factor_avg_key"])
        else:
            edited_diag = ratio
    assert edited_diag == pytest.approx(1.0) and original != pytest.approx(1.0)


def test_rome_raises_and_lowers_target_probability(tok, store):
    model = editable_tiny_model("gpt2", n_layers=6)
    prompt = "My favourite place is the Eiffel Tower"
    ids = encode_prompt(tok, prompt, "Eiffel Tower").input_ids
    hp = hparams_for("rome", overrides={"n_context_templates": 2, "context_template_lengths": (4,)})
    target = encode_target(tok, prompt, "Rome")
    before = target_log_probs(model, [ids], [target]).exp().item()
    with edited(model, tok, "rome", EditRequest(prompt, "Eiffel Tower", "Rome"), 2, hp, store):
        raised = target_log_probs(model, [ids], [target]).exp().item()
    assert raised > 10 * before
    # Fact Erasure's direction, on the object the model finds most likely. Its probability is
    # only ~3e-4 in a random model, too little against the weight decay term, so drop that.
    word = top_word(model, tok, prompt)
    target = encode_target(tok, prompt, word)
    before = target_log_probs(model, [ids], [target]).exp().item()
    hp = hp.with_overrides(weight_decay=0.0)
    with edited(
        model, tok, "rome", EditRequest(prompt, "Eiffel Tower", word, "minimize"), 2, hp, store
    ):
        lowered = target_log_probs(model, [ids], [target]).exp().item()
    assert lowered < before / 2


def test_same_edit_twice_gives_identical_update(tok, store):
    model = tiny_model("gpt2", n_layers=4)
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    hp = hparams_for("rome", overrides=FAST)
    updates = []
    for _ in range(2):
        with edited(model, tok, "rome", request, 1, hp, store):
            updates.append(down_proj_weight(model, 1).detach().clone())
    assert torch.equal(updates[0], updates[1])


@pytest.mark.slow
def test_rome_on_the_bundled_model_makes_the_false_object_likely(tmp_path):
    from locedit.models import load_model
    from locedit.models.architecture import n_layers

    model, tokenizer = load_model("gemma-3-270m")
    store = CovarianceStore(
        tmp_path, CorpusSpec(n_samples=48, sample_length=64, batch_size=16), tokenizer
    )
    prompt, subject = "The Eiffel Tower is located in the city of", "Eiffel Tower"
    ids = encode_prompt(tokenizer, prompt, subject).input_ids
    targets = [encode_target(tokenizer, prompt, o) for o in ("Rome", "Paris")]
    p_false, p_true = target_log_probs(model, [ids, ids], targets).exp().tolist()
    assert p_true > 0.5 and p_false < 0.01  # a fact the model knows
    layer = n_layers(model) // 2
    with edited(
        model,
        tokenizer,
        "rome",
        EditRequest(prompt, subject, "Rome"),
        layer,
        hparams_for("rome"),
        store,
    ) as result:
        p_false_after, p_true_after = target_log_probs(model, [ids, ids], targets).exp().tolist()
    assert p_false_after > 0.5 and p_true_after < p_true
    assert result.diagnostics["v_target_prob_last"] > 0.5
    assert result.seconds < 300


def test_mom2_adjustment_false_uses_the_bare_key_direction(tok, store):
    """The original's ``mom2_adjustment: false``: u = k_avg / |k_avg|, no second moments."""
    model = tiny_model("llama", n_layers=4)
    hp = hparams_for("rome", overrides={**FAST, "mom2_adjustment": False, "v_steps": 3})
    with edited(model, tok, "rome", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 2, hp, store) as r:
        pass
    k_avg = r.tensors["k_avg"].double().numpy()
    np.testing.assert_allclose(r.tensors["u"].numpy(), k_avg / np.linalg.norm(k_avg), rtol=1e-5, atol=1e-7)
    adjusted = hparams_for("rome", overrides={**FAST, "v_steps": 3})
    with edited(model, tok, "rome", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 2, adjusted, store) as a:
        pass
    assert not np.allclose(a.tensors["u"].numpy(), r.tensors["u"].numpy(), atol=1e-3)


def test_relative_step_and_early_stop_on_probability(tok):
    """v_lr_relative r: Adam's first step moves every coordinate of delta by r x RMS(v_init)
    (Adam's first update is lr x sign(g) up to its epsilon); early_stop_prob stops the
    optimisation once mean p(target) reaches it."""
    from locedit.editing.batch import build_batch
    from locedit.editing.vstar import optimise_vstar
    from locedit.models.architecture import component_module
    from locedit.models.scoring import pad_token_id

    model = editable_tiny_model("gpt2", n_layers=4)
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    batch = build_batch(tok, request, encode_target(tok, PROMPT, "Rome"), pad_id=pad_token_id(model))
    module = component_module(model, "mlp", 1)
    hp = hparams_for(
        "rome",
        overrides={"v_steps": 2, "v_lr_relative": 0.05, "kl_factor": 0.0, "clamp_norm_factor": 1e3},
    )
    result = optimise_vstar(model, batch, module, 1, hp, "maximize", "rome")
    lr = 0.05 * float(result.init.norm()) / math.sqrt(result.init.numel())
    np.testing.assert_allclose(result.delta.abs().numpy(), lr, rtol=1e-3)
    never = optimise_vstar(
        model, batch, module, 1, hp.with_overrides(v_steps=4, early_stop_prob=1.0), "maximize", "rome"
    )
    assert never.steps == 4
    at_once = optimise_vstar(
        model, batch, module, 1, hp.with_overrides(v_steps=4, early_stop_prob=0.0), "maximize", "rome"
    )
    assert at_once.steps == 1 and float(at_once.delta.abs().max()) == 0.0


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_a_step_the_clamp_zeroes_is_flagged_not_silently_ok(method, tok, store):
    # v_lr=1e30 overflows the step's norm; ROME's clamp then scales delta by max/inf = 0.
    model = editable_tiny_model("gpt2", n_layers=4)
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    prefix = "v" if method == "rome" else "z"
    fast = {**FAST, "n_layers": 1} if method == "memit" else FAST
    normal = hparams_for(method, overrides=fast)
    with edited(model, tok, method, request, 1, normal, store) as result:
        assert not {f"{prefix}_step_zeroed", f"{prefix}_no_progress"} & set(result.flags)
        assert result.diagnostics[f"{prefix}_delta_norm"] > 0
    huge = hparams_for(method, overrides={**fast, "v_lr": 1e30, "clamp_norm_factor": 1e30})
    with edited(model, tok, method, request, 1, huge, store) as result:
        assert result.diagnostics[f"{prefix}_delta_norm"] == 0.0
        assert result.diagnostics[f"{prefix}_zeroed_steps"] == FAST["v_steps"] - 1
        assert {f"{prefix}_step_zeroed", f"{prefix}_no_progress"} <= set(result.flags)
