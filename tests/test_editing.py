"""The edit interface: bit-identical restoration (also on errors), Fact Forcing's noised
subject, and the cached forwards every method relies on."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from locedit.editing import (
    METHODS,
    EditFailed,
    EditRequest,
    edited,
    hparams_for,
)
from locedit.editing.batch import build_batch, memit_key_mean, template_mean
from locedit.editing.forward import batch_noise, hidden_states
from locedit.editing.prefix import PrefixCachedForward, split_batch
from locedit.models.architecture import down_proj_name, embedding_module
from locedit.models.hooks import frozen_layers
from locedit.models.noise import noised_subject, subject_noise
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import encode_prompt, encode_target
from locedit.testing import editable_tiny_model, tiny_model

PROMPT = "The Eiffel Tower is located in the city of"
FAST = {
    "rome": {"n_context_templates": 2, "context_template_lengths": (4,), "v_steps": 4},
    "memit": {"n_context_templates": 2, "context_template_lengths": (4,), "v_steps": 4},
    "ft1": {"steps": 4, "linf_eps": 1e-2},
    "ft5": {"steps": 4, "linf_eps": 1e-2},
}


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_identical(model, saved):
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name


@pytest.mark.parametrize("method", METHODS)
def test_restoration_is_bit_identical_after_edit_and_after_body_raises(method, tok, store):
    model = tiny_model("gpt2", n_layers=4)
    saved = snapshot(model)
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    hp = hparams_for(method, overrides=FAST[method])
    with edited(model, tok, method, request, 1, hp, store) as result:
        assert result.changed and all(
            not torch.equal(dict(model.named_parameters())[n], saved[n]) for n in result.changed
        )
        assert result.seconds > 0
        json.dumps(result.to_record())
    assert_identical(model, saved)
    with (
        pytest.raises(RuntimeError, match="body failed"),
        edited(model, tok, method, request, 1, hp, store),
    ):
        raise RuntimeError("body failed")
    assert_identical(model, saved)


def test_nan_in_an_optimisation_aborts_and_restores(tok, store):
    model = tiny_model("gpt2", n_layers=4)
    saved = snapshot(model)
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    inf = float("inf")  # Adam refuses a NaN learning rate; an infinite one makes NaN updates
    for method, overrides in (
        ("rome", {"v_lr": inf}),
        ("memit", {"v_lr": inf}),
        ("ft1", {"lr": inf}),
        ("ft5", {"lr": inf}),
    ):
        # the config path refuses a non-finite step (test_overrides.py); built directly here
        hp = dataclasses.replace(hparams_for(method, overrides=FAST[method]), **overrides)
        with pytest.raises(EditFailed, match=rf"^{method} edit failed: non-finite"):
            with edited(model, tok, method, request, 1, hp, store):
                pytest.fail("the block must not run")
        assert_identical(model, saved)


class _PoisonedStore:
    """A store whose covariance for one layer is NaN: MEMIT fails after editing layers below."""

    def __init__(self, inner, bad_layer):
        self.inner, self.bad_layer = inner, bad_layer

    def context_templates(self, *args, **kwargs):
        return self.inner.context_templates(*args, **kwargs)

    def solver(self, model, layer, ridge=0.0):
        if layer == self.bad_layer:
            from locedit.editing import CovarianceSolver

            return CovarianceSolver(torch.full((4, 4), float("nan")))
        return self.inner.solver(model, layer, ridge)


def test_failure_midway_through_memit_restores_the_layers_already_edited(tok, store, monkeypatch):
    model = tiny_model("gpt2", n_layers=6)
    saved = snapshot(model)
    edited_before_failure = []
    import locedit.editing.memit as memit

    original_add = torch.Tensor.add_

    def spy(self, other, *args, **kwargs):
        for name, p in model.named_parameters():
            if p is self:
                edited_before_failure.append(name)
        return original_add(self, other, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "add_", spy)
    hp = hparams_for("memit", overrides=FAST["memit"])
    with pytest.raises(EditFailed, match="layer 3"):
        with edited(
            model,
            tok,
            "memit",
            EditRequest(PROMPT, "Eiffel Tower", "Rome"),
            2,
            hp,
            _PoisonedStore(store, 3),
        ):
            pass
    monkeypatch.undo()
    assert edited_before_failure == [
        down_proj_name(model, 0),
        down_proj_name(model, 1),
        down_proj_name(model, 2),
    ]
    assert_identical(model, saved)
    assert memit  # the module under test


def test_wrong_hparams_type_is_rejected(tok, store):
    model = tiny_model("gpt2", n_layers=2)
    with pytest.raises(TypeError, match="RomeHParams"):
        with edited(
            model,
            tok,
            "rome",
            EditRequest(PROMPT, "Eiffel Tower", "Rome"),
            0,
            hparams_for("ft1"),
            store,
        ):
            pass


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama", "gemma3_text"])
def test_prefix_cached_and_frozen_forwards_match_a_full_forward(family, tok, store):
    model = tiny_model(family, n_layers=4)
    templates = store.context_templates(model, tok, (4, 6), 2, 0)
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    target = encode_target(tok, PROMPT, "Rome")
    batch = build_batch(tok, request, target, templates, ["{} is a"])
    with torch.no_grad():
        full = hidden_states(model, batch)
        split = split_batch(batch)
        forward = PrefixCachedForward(model, split)
        with frozen_layers(model, forward, 2):
            cached = forward()
            cached_again = forward()
    for row in range(batch.size):
        n = int(batch.attention_mask[row].sum())
        cut = int(batch.lookup[row])
        torch.testing.assert_close(cached[row, : n - cut], full[row, cut:n], atol=2e-5, rtol=1e-4)
    assert torch.equal(cached, cached_again)


def test_noise_lands_on_each_rows_subject_tokens(tok, store):
    model = tiny_model("gpt2", n_layers=2)
    enc = encode_prompt(tok, PROMPT, "Eiffel Tower")
    n_tok = enc.subject_end - enc.subject_start
    noise = subject_noise(3, n_tok, 64, sigma=0.5, seed=1)
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome", subject_noise=noise)
    templates = ["{}", "Some text. {}", "Other words here. {}"]
    batch = build_batch(tok, request, encode_target(tok, PROMPT, "Rome"), templates, ["{} is a"])
    assert batch.n_rewrite == 3 * len(templates)  # every template once per noise sample
    seen = {}
    with torch.no_grad(), batch_noise(model, batch):
        # Registered after the noise hooks, so it sees the embeddings they produce.
        def capture(_module, _inputs, output):
            seen.setdefault("emb", output.detach())

        handle = embedding_module(model).register_forward_hook(capture)
        model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    handle.remove()
    clean = embedding_module(model)(batch.input_ids)
    for row in range(batch.size):
        expected = torch.zeros_like(clean[row])
        sample = batch.noise_sample[row]
        if sample is not None:
            start = batch.subject_start[row]
            expected[start : start + n_tok] = noise[sample]
        torch.testing.assert_close(seen["emb"][row] - clean[row], expected, atol=1e-6, rtol=0)
    assert batch.noise_sample[-1] is None  # the KL row stays clean
    # One sample per context template, cycling; the bare prompt keeps all three.
    cheap = build_batch(
        tok, request, encode_target(tok, PROMPT, "Rome"), templates, [], noise_per_template=1
    )
    assert cheap.noise_sample == (0, 1, 2, 0, 1)
    assert cheap.bare.tolist() == [True, True, True, False, False]
    # Keys average per template first: the bare prompt's three rows count once.
    values = torch.arange(cheap.size, dtype=torch.float64)[:, None]
    assert float(template_mean(values, cheap)) == pytest.approx((1.0 + 3.0 + 4.0) / 3)
    # MEMIT's compute_ks: mean of (bare prompt, mean of the templates): the bare prompt 1/2.
    assert float(memit_key_mean(values, cheap)) == pytest.approx((1.0 + (3.0 + 4.0) / 2) / 2)
    assert float(memit_key_mean(values[:3], _only_bare(cheap))) == pytest.approx(1.0)


def _only_bare(batch):
    from dataclasses import replace

    return replace(batch, template=(0, 0, 0))


def test_fact_forcing_finetune_raises_the_noised_probability(tok):
    model = editable_tiny_model("gpt2", n_layers=4)
    prompt = "My favourite place is the Eiffel Tower"
    enc = encode_prompt(tok, prompt, "Eiffel Tower")
    n_tok = enc.subject_end - enc.subject_start
    noise = subject_noise(4, n_tok, 64, sigma=1.0, seed=2)
    target = encode_target(tok, prompt, "Paris")

    def noised_probability():
        with noised_subject(model, enc.subject_start, enc.subject_end, noise):
            log_probs = target_log_probs(model, [enc.input_ids] * 4, [target] * 4)
        return float(log_probs.exp().mean())

    def clean_probability():
        return float(target_log_probs(model, [enc.input_ids], [target]).exp())

    before, clean_before = noised_probability(), clean_probability()
    request = EditRequest(prompt, "Eiffel Tower", "Paris", subject_noise=noise)
    hp = hparams_for("ft5", overrides={"linf_eps": 1e-2, "steps": 10})
    with edited(model, tok, "ft5", request, 2, hp) as result:
        after = noised_probability()
        # The objective the edit reports is the mean NLL over the noise samples.
        first = result.diagnostics["ft_target_prob_first"]
        clean_after = clean_probability()
    log_probs = []
    for sample in range(4):
        with noised_subject(model, enc.subject_start, enc.subject_end, noise[sample]):
            log_probs.append(float(target_log_probs(model, [enc.input_ids], [target])))
    assert first == pytest.approx(np.exp(np.mean(log_probs)), rel=1e-4)
    assert after > 3 * before
    assert clean_after != pytest.approx(clean_before)


def test_rome_with_noised_subject_uses_the_noised_keys(tok, store):
    model = tiny_model("llama", n_layers=4)
    enc = encode_prompt(tok, PROMPT, "Eiffel Tower")
    noise = subject_noise(2, enc.subject_end - enc.subject_start, 64, sigma=0.3, seed=0)
    hp = hparams_for("rome", overrides=FAST["rome"])
    with edited(
        model, tok, "rome", EditRequest(PROMPT, "Eiffel Tower", "Rome"), 1, hp, store
    ) as clean:
        pass
    with edited(
        model,
        tok,
        "rome",
        EditRequest(PROMPT, "Eiffel Tower", "Rome", subject_noise=noise),
        1,
        hp,
        store,
    ) as noised:
        pass
    # k_prompt is the mean over the noise samples of the noised prompt's key.
    keys = []
    module = model.model.layers[1].mlp.down_proj
    for sample in range(2):
        seen = {}

        def capture(_module, inputs, _output, seen=seen):
            seen.setdefault("k", inputs[0][0, enc.last_subject_index].detach())

        handle = module.register_forward_hook(capture)
        with (
            torch.no_grad(),
            noised_subject(model, enc.subject_start, enc.subject_end, noise[sample]),
        ):
            model(torch.tensor([enc.input_ids]))
        handle.remove()
        keys.append(seen["k"].double())
    torch.testing.assert_close(
        noised.tensors["k_prompt"].double(), torch.stack(keys).mean(0), atol=1e-5, rtol=1e-4
    )
    assert not torch.allclose(noised.tensors["k_prompt"], clean.tensors["k_prompt"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_fast_vstar_equals_the_straightforward_compute_v(family, tok, store):
    """Prefix cache, frozen layers and selective unembedding change nothing but the cost."""
    from locedit.editing.batch import request_batch
    from locedit.editing.reference import optimise_vstar_reference
    from locedit.editing.vstar import optimise_vstar
    from locedit.models.architecture import component_module

    model = tiny_model(family, n_layers=4, seed=1)
    hp = hparams_for("rome").with_overrides(v_steps=6, kl_factor=0.5)
    templates = store.context_templates(model, tok, (4, 6), 2, 0)
    request = EditRequest(PROMPT, "Eiffel Tower", "Rome")
    batch = request_batch(model, tok, request, templates, hp)
    layer = 1
    module = component_module(model, "mlp", layer)
    fast = optimise_vstar(model, batch, module, layer, hp, "maximize", "rome")
    reference = optimise_vstar_reference(model, batch, module, hp, "maximize")
    assert fast.steps == 6 and float(fast.delta.norm()) > 0
    torch.testing.assert_close(fast.target, reference, atol=1e-4, rtol=1e-4)
