"""Symmetric token replacement (STR, Zhang & Nanda 2024) as the corruption of Causal Tracing.

Tiny random models in float64: the embedding delta must equal true token replacement, the fast
path must equal the reference, and the draw must be seeded, same-length and order-free.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from locedit.data.records import FactRecord
from locedit.models.architecture import component_module, n_layers
from locedit.testing import gpt2_tokenizer, tiny_model
from locedit.tracing import ResultCache, TraceSettings, encode_fact, trace_records
from locedit.tracing.cache import str_tracing_key, tracing_key
from locedit.tracing.causal_trace import trace_fact_many, trace_fact_reference
from locedit.tracing.patching import SkipFact
from locedit.tracing.replacement import (
    STR_METHOD,
    StrTraceResult,
    SubjectPool,
    draw_replacements,
    replacement_noise,
)
from locedit.tracing.runner import parse_corruption

CITIES = ("Paris", "Rome", "London", "Tokyo", "Madrid", "Vienna", "Berlin", "Moscow", "Cairo")
FACTS = [
    FactRecord(f"c{i}", city, f"The city of {city} is located in the country of", "France")
    for i, city in enumerate(CITIES)
] + [
    FactRecord("long", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French"),
    FactRecord("dup", "Paris", "The mayor of Paris is a", "man"),
]
MID = FACTS[0]  # " Paris", one token, in the middle of the prompt


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f, n_layers=4, seed=1).double() for f in ("gpt2", "gemma3_text", "llama")}


@pytest.fixture(scope="module")
def pool(tok):
    return SubjectPool.from_records(tok, FACTS)


def _draw(tok, pool, fact=MID, n=3, seed=0):
    return draw_replacements(tok, fact, encode_fact(tok, fact), pool, n, seed)


def _target_prob(logits: torch.Tensor, inp) -> torch.Tensor:
    """p(o_true) per row: product of the object's token probabilities (teacher forcing)."""
    logp = torch.log_softmax(logits.double(), -1)
    total = torch.zeros(logits.shape[0], dtype=torch.float64)
    for position, target in zip(inp.target_positions, inp.target_ids, strict=True):
        total += logp[:, position, target].cpu()
    return total.exp()


# --------------------------------------------------------------------------- the draw


def test_draw_is_same_length_never_the_own_subject_and_distinct(tok, pool):
    draw = _draw(tok, pool, n=4)
    inp = encode_fact(tok, MID)
    assert len(draw.subjects) == 4 and draw.n_distinct == 4 and not draw.cycled
    assert "Paris" not in draw.subjects
    for subject, ids in zip(draw.subjects, draw.replaced_ids, strict=True):
        assert subject in CITIES
        assert len(ids) == len(inp.input_ids)
        s, e = inp.subject_start, inp.subject_end
        assert ids[:s] == inp.input_ids[:s] and ids[e:] == inp.input_ids[e:]
        assert tok.decode(list(ids[s:e])).strip() == subject
    # The source fact of each replacement is recorded (the first fact with that subject).
    assert draw.source_fact_ids == tuple(f"c{CITIES.index(s)}" for s in draw.subjects)


def test_draw_is_seeded_and_independent_of_pool_order(tok, pool):
    shuffled = list(FACTS)
    random.Random(5).shuffle(shuffled)
    same = _draw(tok, SubjectPool.from_records(tok, shuffled), n=4)
    assert same.subjects == _draw(tok, pool, n=4).subjects
    others = {_draw(tok, pool, n=4, seed=s).subjects for s in range(1, 6)}
    assert len(others | {same.subjects}) > 1  # another seed, another draw


def test_draw_cycles_when_the_pool_is_small_and_skips_when_empty(tok, pool):
    many = _draw(tok, pool, n=12)
    assert many.cycled and many.n_distinct == len(CITIES) - 1
    k = many.n_distinct
    assert many.subjects[k:] == many.subjects[: 12 - k]  # cycled in rank order
    long = FACTS[-2]
    with pytest.raises(SkipFact, match="no replacement subject"):
        _draw(tok, pool, fact=long)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("family", "kind", "window"),
    [
        ("gpt2", "mlp", 3),
        ("gemma3_text", "mlp", 1),
        ("llama", "resid", 3),
        ("gpt2", "attn", 1),
    ],
)
def test_str_fast_path_equals_reference(models, tok, pool, family, kind, window):
    model = models[family]
    draw = _draw(tok, pool, n=3)
    noise = replacement_noise(model, encode_fact(tok, MID), draw.replaced_ids)
    fast = trace_fact_many(model, tok, MID, kinds=(kind,), windows=(window,), noise=noise)[0]
    ref = trace_fact_reference(model, tok, MID, kind=kind, window=window, noise=noise)
    np.testing.assert_allclose(fast.p_restored, ref.p_restored, rtol=1e-9, atol=0)
    assert fast.p_noised == pytest.approx(ref.p_noised, rel=1e-9)
    assert np.abs(ref.p_restored - ref.p_noised).max() > 1e-3 * ref.p_noised  # not vacuous


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_embedding_delta_is_true_token_replacement(models, tok, pool, family):
    """The corrupted run equals the model run on the replacement prompt's own token ids, for
    GPT-2 (position embeddings after the embedding module) and Gemma (scaled embeddings), and
    one restoration equals a hand-made patch with a plain forward hook."""
    model = models[family]
    inp = encode_fact(tok, MID)
    draw = _draw(tok, pool, n=3)
    noise = replacement_noise(model, inp, draw.replaced_ids)
    token, layer = inp.subject_end - 1, 1
    result = trace_fact_many(model, tok, MID, kinds=("mlp",), windows=(1,), noise=noise)[0]

    mlp = component_module(model, "mlp", layer)
    clean_out = {}
    handle = mlp.register_forward_hook(lambda m, i, o: clean_out.setdefault("o", o.detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor([inp.input_ids]))
    handle.remove()

    replaced = torch.tensor([list(ids) for ids in draw.replaced_ids])
    with torch.no_grad():
        p_swapped = _target_prob(model(input_ids=replaced).logits, inp)

    def restore(module, args, output):
        output = output.clone()
        output[:, token] = clean_out["o"][0, token]
        return output

    handle = mlp.register_forward_hook(restore)
    try:
        with torch.no_grad():
            p_restored = _target_prob(model(input_ids=replaced).logits, inp)
    finally:
        handle.remove()
    assert result.p_noised == pytest.approx(float(p_swapped.mean()), rel=1e-9)
    assert result.p_restored[token, layer] == pytest.approx(float(p_restored.mean()), rel=1e-9)
    assert abs(float(p_restored.mean() - p_swapped.mean())) > 1e-4 * float(p_swapped.mean())
    assert n_layers(model) == result.p_restored.shape[1]


# --------------------------------------------------------------------------- runner


def test_parse_corruption():
    assert parse_corruption("gaussian") == ("gaussian",)
    assert parse_corruption(["str", "gaussian", "str"]) == ("gaussian", "str")
    assert TraceSettings.from_config({"corruption": "str"}).corruption == ("str",)
    with pytest.raises(ValueError, match="corruption"):
        parse_corruption(["resample"])
    with pytest.raises(ValueError, match="corruption"):
        TraceSettings(corruption=())
    assert TraceSettings.from_config({}).str_pool == "prepare"
    with pytest.raises(ValueError, match="str_pool"):
        TraceSettings(str_pool="everything")


def _run(model, tok, facts, settings, cache=None, seed=0):
    return trace_records(
        model,
        tok,
        facts,
        settings,
        sigma=0.5,
        seed=seed,
        fingerprint="tiny",
        cache=cache,
        progress=False,
    )


def test_runner_traces_both_corruptions_with_separate_cached_keys(models, tok, tmp_path):
    model = models["gpt2"]
    facts = FACTS[:4] + [FACTS[-2]]
    settings = TraceSettings(windows=(1,), noise_samples=2, corruption=("gaussian", "str"))
    cache = ResultCache(tmp_path / "cache")
    run = _run(model, tok, facts, settings, cache)
    table = run.table()
    assert set(table.method) == {"tracing", STR_METHOD, "zeroing"}
    assert table[table.method == STR_METHOD].fact_id.nunique() == 4
    assert run.skipped == [
        {"fact_id": "long", "reason": run.skipped[0]["reason"], "corruption": "str"}
    ]
    assert table[table.method == "tracing"].fact_id.nunique() == 5  # Gaussian still traces it
    swapped = [r for r in run.tracing if isinstance(r, StrTraceResult)]
    assert all(np.isnan(r.sigma) for r in swapped)
    assert swapped[0].replacements == run.replacements[swapped[0].fact_id].subjects
    # The STR key differs from the Gaussian key of the same fact, kind and window.
    draw = run.replacements["c0"]
    assert str_tracing_key("tiny", FACTS[0], "mlp", 1, draw.subjects, 0) != tracing_key(
        "tiny", FACTS[0], "mlp", 1, 2, 0.5, 0
    )
    other = tuple(reversed(draw.subjects))
    assert str_tracing_key("tiny", FACTS[0], "mlp", 1, other, 0) != str_tracing_key(
        "tiny", FACTS[0], "mlp", 1, draw.subjects, 0
    )  # another draw (seed or pool), another key
    # A rerun comes from the cache, STR results included, with identical numbers.
    again = _run(model, tok, facts, settings, cache)
    assert again.n_computed == 0 and again.n_cached == 5
    cached = [r for r in again.tracing if isinstance(r, StrTraceResult)]
    assert [r.replacements for r in cached] == [r.replacements for r in swapped]
    for a, b in zip(cached, swapped, strict=True):
        np.testing.assert_array_equal(a.p_restored, b.p_restored)
    # STR alone gives the same STR rows; Gaussian alone gives no STR rows.
    only = _run(
        model, tok, facts, TraceSettings(windows=(1,), noise_samples=2, corruption=("str",))
    )
    np.testing.assert_allclose(
        only.table().query("method == @STR_METHOD").effect_max.to_numpy(),
        table.query("method == @STR_METHOD").effect_max.to_numpy(),
        rtol=1e-12,
    )


def test_str_effects_are_reproducible_per_seed(models, tok):
    model = models["gpt2"]
    settings = TraceSettings(windows=(1,), noise_samples=2, corruption=("str",), zeroing=False)
    first = _run(model, tok, FACTS[:3], settings, seed=7)
    second = _run(model, tok, list(reversed(FACTS[:3])), settings, seed=7)
    assert {k: v.subjects for k, v in first.replacements.items()} == {
        k: v.subjects for k, v in second.replacements.items()
    }
    a = first.table().sort_values(["fact_id", "layer"]).effect_max.to_numpy()
    b = second.table().sort_values(["fact_id", "layer"]).effect_max.to_numpy()
    np.testing.assert_array_equal(a, b)
    other = _run(model, tok, FACTS[:3], settings, seed=8)
    assert {k: v.subjects for k, v in other.replacements.items()} != {
        k: v.subjects for k, v in first.replacements.items()
    }


def test_runner_reference_path_gives_the_fast_paths_str_effects(models, tok):
    model = models["gpt2"]
    common = {"windows": (3,), "noise_samples": 2, "corruption": ("str",), "zeroing": False}
    fast = _run(model, tok, FACTS[:2], TraceSettings(fast=True, **common)).table()
    ref = _run(model, tok, FACTS[:2], TraceSettings(fast=False, **common)).table()
    assert set(ref.method) == {STR_METHOD}
    np.testing.assert_allclose(ref.effect_max, fast.effect_max, rtol=1e-7, atol=1e-9)
