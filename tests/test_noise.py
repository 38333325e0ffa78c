"""Noise calibration (sigma = 3 x std of subject-token embeddings) and the shared noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locedit.data.records import FactRecord
from locedit.models.tokens import encode_prompt
from locedit.testing import gpt2_tokenizer, tiny_model
from locedit.tracing import calibrate_noise, fact_seed, subject_noise

FACTS = [
    FactRecord("a", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French"),
    FactRecord("b", "Toko Yasuda", "Toko Yasuda plays the", "guitar"),
    FactRecord("c", "Paris", "The capital of France is Paris", "is"),
    FactRecord(
        "d",
        "Autonomous University of Madrid",
        "Autonomous University of Madrid, which is located in",
        "Spain",
    ),
]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_calibration_equals_numpy(tok, family):
    """Embedding rows by hand (times Gemma's sqrt(d_model) scale, which its embedding module
    applies), std with ddof=1 over every coordinate of every subject token."""
    model = tiny_model(family, n_layers=1)
    weight = model.get_input_embeddings().weight.detach().double().numpy()
    scale = np.sqrt(64) if family == "gemma3_text" else 1.0
    rows = []
    for fact in FACTS:
        enc = encode_prompt(tok, fact.prompt, fact.subject)
        rows.append(weight[enc.input_ids[enc.subject_start : enc.subject_end]] * scale)
    expected = 3.0 * np.concatenate([r.reshape(-1) for r in rows]).std(ddof=1)
    result = calibrate_noise(model, tok, FACTS, multiplier=3.0)
    assert result.calibrated and result.n_facts == len(FACTS)
    assert result.sigma == pytest.approx(expected, rel=1e-5)
    assert calibrate_noise(model, tok, FACTS, multiplier=1.5).sigma == pytest.approx(
        expected / 2, rel=1e-5
    )


def test_calibration_skips_bad_facts_and_honours_override(tok):
    model = tiny_model("gpt2", n_layers=1)
    bad = [
        FactRecord("x", "", "An empty subject", "y"),
        FactRecord("y", "Nowhere", "Not in prompt", "z"),
    ]
    assert calibrate_noise(model, tok, FACTS + bad).n_facts == len(FACTS)
    fixed = calibrate_noise(model, tok, FACTS, override=0.094)
    assert fixed.sigma == 0.094 and not fixed.calibrated
    assert fixed.to_json() == {"sigma": 0.094, "multiplier": 3.0, "n_facts": 0, "calibrated": False}


def test_subject_noise_is_seeded_per_fact():
    a = subject_noise(10, 3, 8, 2.0, fact_seed(0, "fact-1"))
    assert torch.equal(a, subject_noise(10, 3, 8, 2.0, fact_seed(0, "fact-1")))
    assert not torch.equal(a, subject_noise(10, 3, 8, 2.0, fact_seed(0, "fact-2")))
    expected = 2.0 * torch.randn(
        10, 3, 8, generator=torch.Generator().manual_seed(fact_seed(0, "fact-1"))
    )
    assert torch.equal(a, expected)


def test_fact_forcing_is_scored_on_fresh_noise(tok):
    """The noised probes that judge an edit use their own seed stream: not the tensor the edit
    was optimised on (that stays as tracing's), and the same draws on every call."""
    import hashlib

    from locedit.metrics.evaluation import build_probes, noise_for_request, probe_probabilities
    from locedit.models.noise import SCORING_STREAM, NoiseConfig, d_model, noise_seed
    from locedit.models.tokens import encode_target

    model = tiny_model("gpt2", n_layers=2)
    fact = FactRecord("f1", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French")
    config = NoiseConfig(sigma=0.5, n_samples=3, seed=7)
    # The seeds, computed independently: sha256 of "<seed>:<id>" (training) and of
    # "<seed>:score:<id>" (scoring), first 4 bytes little-endian.
    def by_hand(text):
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    assert noise_seed(7, "f1") == fact_seed(7, "f1") == by_hand("7:f1")
    assert noise_seed(7, "f1", SCORING_STREAM) == by_hand("7:score:f1") != by_hand("7:f1")

    enc = encode_prompt(tok, fact.prompt, fact.subject)
    n_tok = enc.subject_end - enc.subject_start
    training = noise_for_request(model, tok, fact, config)
    assert torch.equal(training, subject_noise(3, n_tok, d_model(model), 0.5, by_hand("7:f1")))

    probes = [p for p in build_probes(tok, fact, None, noised=True) if p.subject_span is not None]
    key = "rewrite/0/o_true_noised"
    first = probe_probabilities(model, probes, fact, config)
    assert probe_probabilities(model, probes, fact, config) == first  # reproducible

    target = encode_target(tok, fact.prompt, fact.target_true)

    def noised_p(noise):
        # The noised forward by hand: embeddings + noise over the subject, inputs_embeds.
        embeds = model.get_input_embeddings()(torch.tensor([enc.input_ids] * 3))
        embeds = embeds.clone()
        embeds[:, enc.subject_start : enc.subject_end] += noise
        with torch.no_grad():
            logits = model(inputs_embeds=embeds).logits.log_softmax(-1)
        start = len(enc.input_ids) - 1
        log_p = sum(logits[:, start + i, t] for i, t in enumerate(target))
        return float(log_p.exp().mean())

    scoring = subject_noise(3, n_tok, d_model(model), 0.5, by_hand("7:score:f1"))
    assert first[key] == pytest.approx(noised_p(scoring), rel=1e-5)
    assert first[key] != pytest.approx(noised_p(training), rel=1e-3)
