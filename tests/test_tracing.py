"""Causal Tracing and representation zeroing on tiny random models (float64, so numbers agree
to ~1e-12 and a tolerance of 1e-5 on effects is meaningful even for tiny probabilities)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from locedit.data.records import FactRecord
from locedit.models.architecture import n_layers
from locedit.testing import gpt2_tokenizer, tiny_model
from locedit.tracing import (
    encode_fact,
    fact_seed,
    noised_subject,
    patched_target_probs,
    subject_noise,
    trace_fact,
    trace_fact_many,
    trace_fact_reference,
    window_layers,
    zero_fact,
)
from locedit.tracing.patching import captured_components, set_positions

SIGMA = 0.5
SEED = 3
# The subject sits after a few context tokens, so tokens before it are traced too.
MIDDLE = FactRecord(
    "mid", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French"
)
# Subject first; a multi-token object (product of token probabilities).
FIRST = FactRecord("first", "Toko Yasuda", "Toko Yasuda plays the", "guitar and piano")
# Subject last, single-token object: restoring it everywhere must undo the noise exactly.
LAST = FactRecord("last", "Paris", "The capital of France is Paris", "is")


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def models():
    return {
        f: tiny_model(f, n_layers=4, seed=1).double()
        for f in ("gpt2", "llama", "gemma3_text", "gpt_neox")
    }


@pytest.mark.parametrize(
    ("family", "fact", "kind", "window"),
    [
        ("gpt2", MIDDLE, "mlp", 3),
        ("gpt2", FIRST, "resid", 1),
        ("llama", MIDDLE, "attn", 5),
        ("gemma3_text", FIRST, "mlp", 10),
        ("gpt_neox", MIDDLE, "resid", 3),
    ],
)
def test_fast_path_equals_reference(models, tok, family, fact, kind, window):
    model = models[family]
    args = {"sigma": SIGMA, "seed": SEED, "kind": kind, "window": window, "n_samples": 3}
    fast = trace_fact(model, tok, fact, **args)
    ref = trace_fact_reference(model, tok, fact, **args)
    assert fast.p_restored.shape == ref.p_restored.shape == (len(fast.tokens), 4)
    np.testing.assert_allclose(fast.p_restored, ref.p_restored, rtol=1e-9, atol=0)
    assert fast.p_clean == pytest.approx(ref.p_clean, rel=1e-9)
    assert fast.p_noised == pytest.approx(ref.p_noised, rel=1e-9)
    np.testing.assert_allclose(fast.effect, ref.effect, atol=1e-5)
    np.testing.assert_array_equal(fast.argmax_token, ref.argmax_token)
    # Restoring a token before the subject changes nothing: effect 0 in the reference too.
    np.testing.assert_allclose(ref.effect[: ref.subject_start], 0.0, atol=1e-9)
    # The restorations really change p (the test would be vacuous otherwise).
    assert np.abs(ref.p_restored - ref.p_noised).max() > 1e-3 * abs(ref.denominator)


def test_many_kinds_and_windows_share_runs(models, tok):
    model = models["gpt2"]
    both = trace_fact_many(
        model,
        tok,
        MIDDLE,
        sigma=SIGMA,
        seed=SEED,
        kinds=("mlp", "attn"),
        windows=(1, 3),
        n_samples=2,
    )
    assert [(r.kind, r.window) for r in both] == [("mlp", 1), ("mlp", 3), ("attn", 1), ("attn", 3)]
    single = trace_fact(
        model, tok, MIDDLE, sigma=SIGMA, seed=SEED, kind="attn", window=3, n_samples=2
    )
    np.testing.assert_allclose(both[3].p_restored, single.p_restored, rtol=1e-12)


def test_tokens_before_subject_have_zero_effect(models, tok):
    """Exactly zero in the fast path (the reference agrees to 1e-9 in the test above)."""
    fast = trace_fact(models["llama"], tok, MIDDLE, sigma=SIGMA, seed=SEED, window=3, n_samples=2)
    assert fast.subject_start == 4
    assert (fast.effect[: fast.subject_start] == 0.0).all()
    assert (fast.p_restored[: fast.subject_start] == fast.p_noised).all()
    assert np.abs(fast.effect[fast.subject_start :]).max() > 1e-3


def test_restoring_every_subject_token_everywhere_recovers_p_clean(models, tok):
    """Residual stream restored at all layers and all subject tokens (the subject ends the
    prompt): every state the noise touched is clean again, so p = p_clean, effect 1."""
    model = models["gpt2"]
    inp = encode_fact(tok, LAST)
    assert inp.subject_end == inp.n_prompt and len(inp.target_ids) == 1
    total = n_layers(model)
    noise = subject_noise(3, inp.n_subject, 64, SIGMA, fact_seed(SEED, LAST.fact_id))
    with torch.no_grad(), captured_components(model, "resid", range(total)) as clean:
        model(input_ids=inp.ids())
    subject = list(range(inp.subject_start, inp.subject_end))
    everywhere = {
        j: set_positions(slice(None), subject, clean[j][0, subject])
        for j in window_layers(0, 2 * total, total)
    }
    assert set(everywhere) == set(range(total))
    p_clean = patched_target_probs(model, inp, None, "resid", {})[0]
    p_noised = patched_target_probs(model, inp, noise, "resid", {}).mean()
    p_restored = patched_target_probs(model, inp, noise, "resid", everywhere)
    assert abs(p_clean - p_noised) > 1e-3 * p_clean
    np.testing.assert_allclose(p_restored.numpy(), p_clean.item(), rtol=1e-12)
    assert ((p_restored.mean() - p_noised) / (p_clean - p_noised)).item() == pytest.approx(
        1.0, abs=1e-9
    )


def test_restoring_last_token_residual_at_last_layer_gives_effect_one(models, tok):
    """In the grid itself: the final residual state at the last token fixes the next-token
    distribution, so every window that covers the last layer scores exactly 1 there."""
    model = models["gemma3_text"]
    result = trace_fact(
        model, tok, LAST, sigma=SIGMA, seed=SEED, kind="resid", window=3, n_samples=3
    )
    last = result.effect[-1]
    covering = [layer for layer in range(4) if 3 in window_layers(layer, 3, 4)]
    np.testing.assert_allclose(last[covering], 1.0, atol=1e-9)


def test_noise_is_the_shared_subject_noise(models, tok):
    """p_noised comes from subject_noise(n, n_subj, d, sigma, fact_seed(seed, fact_id)) added
    at the embedding output, so Tracing Reversal and Fact Forcing can regenerate it."""
    model = models["gpt2"]
    result = trace_fact(model, tok, MIDDLE, sigma=SIGMA, seed=SEED, n_samples=4)
    inp = encode_fact(tok, MIDDLE)
    noise = subject_noise(4, inp.n_subject, 64, SIGMA, fact_seed(SEED, MIDDLE.fact_id))
    with torch.no_grad(), noised_subject(model, inp.subject_start, inp.subject_end, noise):
        logits = model(input_ids=inp.ids(4)).logits.double()
    logp = torch.log_softmax(logits, -1)
    per_sample = sum(
        logp[:, pos, token] for pos, token in zip(inp.target_positions, inp.target_ids, strict=True)
    ).exp()
    assert result.p_noised == pytest.approx(per_sample.mean().item(), rel=1e-10)
    other = trace_fact(model, tok, MIDDLE, sigma=SIGMA, seed=SEED + 1, n_samples=4)
    assert other.p_noised != pytest.approx(result.p_noised, rel=1e-6)


def _rome_noise(sigma: float, seed: int):
    """The original code's noise: ``numpy.random.RandomState(seed).randn`` over the subject
    tokens, scaled by the noise level (ROME's ``trace_with_patch``), as a seeded function."""

    def noise(n_samples: int, n_tokens: int, width: int) -> torch.Tensor:
        draws = np.random.RandomState(seed).randn(n_samples, n_tokens, width)
        return sigma * torch.from_numpy(draws)

    return noise


def test_noise_can_be_given_as_a_tensor_bit_identical_to_sigma_and_seed(models, tok):
    """The fact's seeded noise passed as a tensor gives the same numbers to the last bit."""
    model = models["llama"]
    inp = encode_fact(tok, MIDDLE)
    tensor = subject_noise(3, inp.n_subject, 64, SIGMA, fact_seed(SEED, MIDDLE.fact_id))
    seeded = trace_fact(model, tok, MIDDLE, sigma=SIGMA, seed=SEED, window=3, n_samples=3)
    given = trace_fact(model, tok, MIDDLE, noise=tensor, window=3)
    assert np.array_equal(seeded.p_restored, given.p_restored)
    assert (seeded.p_clean, seeded.p_noised) == (given.p_clean, given.p_noised)
    assert given.n_samples == 3


def test_noise_function_reproduces_another_implementations_noise(models, tok):
    """A seeded noise function (here the original code's numpy RandomState draws) is what the
    fast path, the reference and a hand-written noised forward all use."""
    model = models["gpt2"]
    inp = encode_fact(tok, MIDDLE)
    fn = _rome_noise(SIGMA, 1)
    fast = trace_fact(model, tok, MIDDLE, noise=fn, n_samples=2, window=3)
    ref = trace_fact_reference(model, tok, MIDDLE, noise=fn, n_samples=2, window=3)
    np.testing.assert_allclose(fast.p_restored, ref.p_restored, rtol=1e-9, atol=0)
    draws = SIGMA * np.random.RandomState(1).randn(2, inp.n_subject, 64)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inp.ids(2)).clone()
        embeds[:, inp.subject_start : inp.subject_end] += torch.from_numpy(draws)
        logits = model(inputs_embeds=embeds).logits.double()
    logp = torch.log_softmax(logits, -1)
    per_sample = sum(
        logp[:, pos, token] for pos, token in zip(inp.target_positions, inp.target_ids, strict=True)
    ).exp()
    assert fast.p_noised == pytest.approx(per_sample.mean().item(), rel=1e-10)
    seeded = trace_fact(model, tok, MIDDLE, sigma=SIGMA, seed=1, n_samples=2, window=3)
    assert seeded.p_noised != pytest.approx(fast.p_noised, rel=1e-6)


def test_noise_of_the_wrong_shape_or_missing_is_refused(models, tok):
    with pytest.raises(ValueError, match="noise must be"):
        trace_fact(models["gpt2"], tok, MIDDLE, noise=torch.zeros(2, 1, 64))
    with pytest.raises(ValueError, match="sigma"):
        trace_fact(models["gpt2"], tok, MIDDLE)


def test_toolkit_patches_are_bit_identical_to_raw_hooks(models, tok):
    """A restoration through the intervention toolkit gives the same bits as the same
    restoration written with raw forward hooks (the pre-toolkit way)."""
    model = models["llama"]
    inp = encode_fact(tok, MIDDLE)
    noise = subject_noise(3, inp.n_subject, 64, SIGMA, fact_seed(SEED, MIDDLE.fact_id))
    with torch.no_grad(), captured_components(model, "mlp", range(4)) as clean:
        model(input_ids=inp.ids())
    token = inp.last_subject
    patches = {j: set_positions(slice(None), token, clean[j][0, token]) for j in (1, 2)}
    ours = patched_target_probs(model, inp, noise, "mlp", patches)

    def add_noise(_m, _i, out):
        out = out.clone()
        out[:, inp.subject_start : inp.subject_end] += noise
        return out

    def restore(j):
        def hook(_m, _i, out):
            out = out.clone()
            out[:, token] = clean[j][0, token]
            return out

        return hook

    handles = [model.model.embed_tokens.register_forward_hook(add_noise)]
    handles += [model.model.layers[j].mlp.register_forward_hook(restore(j)) for j in (1, 2)]
    try:
        with torch.no_grad():
            logits = model(input_ids=inp.ids(3)).logits
    finally:
        for handle in handles:
            handle.remove()
    logp = torch.log_softmax(logits[:, inp.target_positions].double(), -1)
    index = torch.tensor(inp.target_ids)[None, :, None].expand(3, -1, 1)
    theirs = logp.gather(2, index)[..., 0].sum(-1).exp()
    assert torch.equal(ours, theirs)


def test_low_denominator_is_flagged(models, tok):
    result = trace_fact(
        models["gpt2"], tok, MIDDLE, sigma=SIGMA, seed=SEED, n_samples=2, min_denominator=0.01
    )
    # A random tiny model gives p ~ 1/vocab: the difference is far below 0.01.
    assert result.low_denominator
    assert all(row["low_denominator"] for row in result.rows())


# --------------------------------------------------------------------------- zeroing


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _manual_gpt2_prob(model, ids, target_pos, target_id, zero_layers, zero_positions) -> float:
    """GPT-2 written out by hand (Conv1D: x @ W + b), MLP outputs zeroed where asked."""
    tr = model.transformer
    seq = len(ids)
    h = tr.wte.weight[ids] + tr.wpe.weight[:seq]
    n_head = model.config.n_head
    hd = h.shape[-1] // n_head
    causal = torch.triu(torch.full((seq, seq), -torch.inf, dtype=h.dtype), diagonal=1)
    for index, block in enumerate(tr.h):
        x = _layer_norm(h, block.ln_1)
        q, k, v = (x @ block.attn.c_attn.weight + block.attn.c_attn.bias).split(h.shape[-1], dim=-1)
        q, k, v = (t.view(seq, n_head, hd).transpose(0, 1) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1)
        a = (att @ v).transpose(0, 1).reshape(seq, -1)
        h = h + a @ block.attn.c_proj.weight + block.attn.c_proj.bias
        x = _layer_norm(h, block.ln_2)
        m = (
            _gelu_new(x @ block.mlp.c_fc.weight + block.mlp.c_fc.bias) @ block.mlp.c_proj.weight
            + block.mlp.c_proj.bias
        )
        if index in zero_layers:
            m = m.clone()
            m[zero_positions] = 0.0
        h = h + m
    logits = _layer_norm(h, tr.ln_f) @ tr.wte.weight.T
    return torch.softmax(logits[target_pos], -1)[target_id].item()


def test_zeroing_matches_hand_written_forward(models, tok):
    model = models["gpt2"]
    fact = FactRecord(
        "z", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French"
    )
    inp = encode_fact(tok, fact)
    assert len(inp.target_ids) == 1
    result = zero_fact(model, tok, fact, kind="mlp", window=3)
    subject = list(range(inp.subject_start, inp.subject_end))
    args = (list(inp.input_ids), inp.n_prompt - 1, inp.target_ids[0])
    with torch.no_grad():
        p_clean = _manual_gpt2_prob(model, *args, set(), [])
        assert result.p_clean == pytest.approx(p_clean, rel=1e-9)
        for layer in range(4):
            span = set(window_layers(layer, 3, 4))
            p_all = _manual_gpt2_prob(model, *args, span, subject)
            p_last = _manual_gpt2_prob(model, *args, span, [inp.last_subject])
            assert result.p_zeroed[layer] == pytest.approx(p_all, rel=1e-9)
            assert result.p_zeroed_last[layer] == pytest.approx(p_last, rel=1e-9)
            assert result.effect[layer] == pytest.approx((p_clean - p_all) / p_clean, abs=1e-9)
    assert np.abs(result.effect).max() > 1e-4


def test_zeroing_leaves_no_hooks(models, tok):
    model = models["llama"]
    zero_fact(model, tok, MIDDLE, kind="attn", window=1)
    assert all(not m._forward_hooks for m in model.modules())


def test_sliding_window_shorter_than_prompt(tok):
    """Gemma-style sliding-window layers that drop keys: the fast path cannot reuse the KV
    cache, recomputes all positions, and still equals the reference (masks from the model)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        num_hidden_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=128,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        vocab_size=50257,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    model = Gemma3ForCausalLM(config).eval().double()  # parameters still require grad
    args = {"sigma": SIGMA, "seed": SEED, "kind": "mlp", "window": 3, "n_samples": 2}
    fast = trace_fact(model, tok, MIDDLE, **args)
    ref = trace_fact_reference(model, tok, MIDDLE, **args)
    np.testing.assert_allclose(fast.p_restored, ref.p_restored, rtol=1e-9)
    np.testing.assert_allclose(fast.effect, ref.effect, atol=1e-5)


def test_restorations_compute_no_indices_from_data_per_token_or_chunk(models, tok, monkeypatch):
    """On a GPU an index computed from data (``torch.nonzero``) waits for the device: the
    restored rows of each layer are worked out once per trace (a layer's worth of calls),
    not per token x layer, and the vocabulary chunks of p(o) pick the target by a mask, with
    the numbers of one chunk."""
    from locedit.tracing.patching import target_probs_from_final

    model = models["gpt2"]
    calls = []
    nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append(1) or nonzero(*a, **k))
    result = trace_fact(model, tok, MIDDLE, sigma=SIGMA, seed=SEED, kind="mlp", window=3,
                        n_samples=3)
    assert len(result.tokens) - result.subject_start >= 3  # several tokens restored
    assert len(calls) <= n_layers(model)
    calls.clear()
    final = torch.randn(5, 2, model.config.n_embd, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    targets = [7, model.config.vocab_size - 1]  # in the first and the last chunk
    chunked = target_probs_from_final(model, final, targets, budget=1)  # 1024 ids a chunk
    assert model.config.vocab_size > 2 * 1024 and not calls
    torch.testing.assert_close(
        chunked, target_probs_from_final(model, final, targets), rtol=1e-12, atol=0
    )
