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
