"""The probes an edit is judged on, their probabilities and the essence perplexity, each against
a computation by hand on a tiny GPT-2 (one full forward, softmax, teacher forcing)."""

from __future__ import annotations

import math

import pytest
import torch

from locedit.data.records import FactRecord
from locedit.metrics.evaluation import (
    EssenceTexts,
    build_probes,
    essence_perplexity,
    probe_probabilities,
)
from locedit.models.noise import SCORING_STREAM
from locedit.problems import NoiseConfig, fact_noise
from locedit.testing import gpt2_tokenizer, tiny_model

RECORD = FactRecord(
    "cf-1", "Eiffel Tower", "The Eiffel Tower is located in", "Paris", "Piazza Navona",
    ("Where is the Eiffel Tower? It is in", "Nothing about it is in"),
    ("The Louvre is located in", "Big Ben is located in"),
)
NOISE = NoiseConfig(sigma=0.5, n_samples=3, seed=7)


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=2)


def test_build_probes_lists_every_probe_with_its_tokens(tok):
    probes = build_probes(tok, RECORD, "London", noised=True)
    keys = [p.key for p in probes]
    assert keys == [
        "rewrite/0/o_true", "rewrite/0/o_false", "rewrite/0/o_noise", "rewrite/0/o_true_noised",
        "paraphrase/0/o_true", "paraphrase/0/o_false", "paraphrase/0/o_noise", "paraphrase/0/o_true_noised",
        # the second paraphrase lost the subject: scored clean, never noised
        "paraphrase/1/o_true", "paraphrase/1/o_false", "paraphrase/1/o_noise",
        # o_noise on the neighbours too: neighborhood_target=problem scores Tracing Reversal on it
        "neighborhood/0/o_false", "neighborhood/0/o_true", "neighborhood/0/o_noise",
        "neighborhood/1/o_false", "neighborhood/1/o_true", "neighborhood/1/o_noise",
    ]
    by_key = {p.key: p for p in probes}
    prompt_ids = tuple(tok.encode(RECORD.prompt))
    assert by_key["rewrite/0/o_true"].prompt_ids == prompt_ids
    assert by_key["rewrite/0/o_true"].target_ids == tuple(tok.encode(" Paris"))
    assert by_key["rewrite/0/o_false"].target_ids == tuple(tok.encode(" Piazza Navona"))
    assert len(by_key["rewrite/0/o_false"].target_ids) > 1
    assert by_key["neighborhood/1/o_true"].prompt_ids == tuple(tok.encode("Big Ben is located in"))
    # the noised probe's span: the subject's tokens, counted by hand
    noised = by_key["rewrite/0/o_true_noised"]
    start = len(tok.encode("The"))
    end = len(tok.encode("The Eiffel Tower"))
    assert noised.subject_span == (start, end) and noised.prompt_ids == prompt_ids
    assert all(p.subject_span is None for p in probes if not p.key.endswith("_noised"))
    # without o_noise or noise, those probes are absent
    plain = [p.key for p in build_probes(tok, RECORD, None, noised=False)]
    assert not any("o_noise" in k or "noised" in k for k in plain) and len(plain) == 10


def _p_by_hand(model, prompt_ids, target_ids, noise=None, span=None) -> float:
    """p(target | prompt): product over target tokens of the softmax at the previous position."""
    ids = torch.tensor([list(prompt_ids) + list(target_ids)])
    with torch.no_grad():
        if noise is None:
            logits = model(ids).logits
        else:
            embeds = model.transformer.wte(ids).repeat(noise.shape[0], 1, 1)
            embeds[:, span[0] : span[1]] += noise
            logits = model(inputs_embeds=embeds).logits
    log_p = torch.log_softmax(logits.double(), -1)
    n = len(prompt_ids)
    per_sample = sum(log_p[:, n - 1 + i, t] for i, t in enumerate(target_ids))
    return float(per_sample.exp().mean())


def test_probe_probabilities_match_a_forward_by_hand(tok, model):
    probes = build_probes(tok, RECORD, "London", noised=True)
    got = probe_probabilities(model, probes, RECORD, NOISE)
    assert set(got) == {p.key for p in probes}
    for probe in probes:
        if probe.subject_span is None:
            expected = _p_by_hand(model, probe.prompt_ids, probe.target_ids)
        else:
            start, end = probe.subject_span
            # the scoring stream: independent of the noise the edit trains on (issue 16)
            noise = fact_noise(RECORD.fact_id, end - start, 64, NOISE, SCORING_STREAM)
            expected = _p_by_hand(model, probe.prompt_ids, probe.target_ids, noise, probe.subject_span)
        assert got[probe.key] == pytest.approx(expected, rel=1e-4), probe.key
    # the noise changes the probability (it is applied, not ignored)
    assert got["rewrite/0/o_true_noised"] != pytest.approx(got["rewrite/0/o_true"], rel=1e-3)
    with pytest.raises(ValueError, match="noise"):
        probe_probabilities(model, probes, RECORD, None)


def test_essence_perplexity_by_hand(tok, model):
    prompt = tuple(tok.encode("Eiffel Tower is a"))
    continuations = [tuple(tok.encode(" tower in Paris")), tuple(tok.encode(" landmark"))]
    texts = EssenceTexts(len(prompt), tuple(prompt + c for c in continuations))
    expected = []
    for cont in continuations:
        ids = torch.tensor([list(prompt + cont)])
        with torch.no_grad():
            log_p = torch.log_softmax(model(ids).logits[0].double(), -1)
        nll = -sum(float(log_p[len(prompt) - 1 + i, t]) for i, t in enumerate(cont)) / len(cont)
        expected.append(math.exp(nll))
    assert essence_perplexity(model, texts) == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert math.isnan(essence_perplexity(model, EssenceTexts(len(prompt), ())))
