"""The five problems: targets, directions, o_noise determinism and the Fact Erasure gate."""

from __future__ import annotations

import pytest
import torch

from locedit.data.records import FactRecord
from locedit.models.noise import fact_seed, subject_noise
from locedit.models.tokens import TokenizationError, encode_prompt, encode_target
from locedit.problems import (
    PROBLEMS,
    NoiseConfig,
    ProblemNotApplicable,
    compute_o_noise,
    edit_target,
    noised_next_token_probs,
)
from locedit.testing import gpt2_tokenizer, tiny_model

RECORD = FactRecord("cf-1", "Eiffel Tower", "The Eiffel Tower is located in", "Paris", "Rome",
                    extra={"erasure_ok": True})
NOISE = NoiseConfig(sigma=0.5, n_samples=4, seed=7)


def test_problem_table_matches_the_paper():
    assert {p: (v.target, v.direction) for p, v in PROBLEMS.items()} == {
        "error_injection": ("o_false", "maximize"),
        "tracing_reversal": ("o_noise", "maximize"),
        "fact_erasure": ("o_true", "minimize"),
        "fact_amplification": ("o_true", "maximize"),
        "fact_forcing": ("o_true", "maximize"),
    }
    assert PROBLEMS["fact_forcing"].noised_input and PROBLEMS["fact_erasure"].needs_erasure_ok


def test_noised_probabilities_equal_a_manual_noised_forward():
    model, tok = tiny_model("gpt2", n_layers=2), gpt2_tokenizer()
    got = noised_next_token_probs(model, tok, RECORD, NOISE)
    enc = encode_prompt(tok, RECORD.prompt, RECORD.subject)
    embeds = model.transformer.wte(torch.tensor([enc.input_ids])).repeat(NOISE.n_samples, 1, 1)
    noise = subject_noise(4, enc.subject_end - enc.subject_start, 64, 0.5, fact_seed(7, "cf-1"))
    embeds[:, enc.subject_start : enc.subject_end] += noise
    with torch.no_grad():
        expected = torch.softmax(model(inputs_embeds=embeds).logits[:, -1], -1).mean(0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_o_noise_is_deterministic_single_word_and_skips_o_true():
    model, tok = tiny_model("gpt2", n_layers=2), gpt2_tokenizer()
    first = compute_o_noise(model, tok, RECORD, NOISE)
    assert first == compute_o_noise(model, tok, RECORD, NOISE)
    assert RECORD.prompt not in first and len(encode_target(tok, RECORD.prompt, first)) == 1
    probs = noised_next_token_probs(model, tok, RECORD, NOISE)
    order = torch.argsort(probs, descending=True).tolist()
    ranked = [tok.decode([t]).strip() for t in order[:200]]
    # o_noise is the top-1 usable next word: every token ranked above it is o_true's first
    # token, a special token, or not a whole word that encodes back to that single token
    (token,) = encode_target(tok, RECORD.prompt, first)
    true_first = encode_target(tok, RECORD.prompt, RECORD.target_true)[0]
    for above in order[: order.index(token)]:
        word = tok.decode([above]).strip()
        usable = bool(word) and any(ch.isalnum() for ch in word)
        if usable:
            try:
                usable = encode_target(tok, RECORD.prompt, word) == [above]
            except TokenizationError:
                usable = False
        assert above == true_first or above in tok.all_special_ids or not usable, (above, word)
    # when o_true is the top word, the next candidate is taken instead
    forced = FactRecord(RECORD.fact_id, RECORD.subject, RECORD.prompt, first, "Rome")
    second = compute_o_noise(model, tok, forced, NOISE)
    assert second != first
    assert ranked.index(second) > ranked.index(first)


def test_edit_targets_and_erasure_gate():
    assert edit_target(PROBLEMS["error_injection"], RECORD) == "Rome"
    assert edit_target(PROBLEMS["fact_forcing"], RECORD) == "Paris"
    assert edit_target(PROBLEMS["tracing_reversal"], RECORD, o_noise="London") == "London"
    weak = FactRecord("cf-2", "Eiffel Tower", RECORD.prompt, "Paris", "Rome", extra={"erasure_ok": False})
    with pytest.raises(ProblemNotApplicable, match="0.02"):
        edit_target(PROBLEMS["fact_erasure"], weak)
    with pytest.raises(ProblemNotApplicable):
        edit_target(PROBLEMS["tracing_reversal"], RECORD)
