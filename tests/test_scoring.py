"""Teacher-forced target probabilities equal a manual product of softmaxes."""

from __future__ import annotations

import torch

from locedit.models.scoring import next_token_log_probs, target_log_probs
from locedit.testing import tiny_model


def _manual_log_prob(model, prompt, target):
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0].double(), dim=-1)
    total = 1.0
    for offset, token in enumerate(target):
        total *= float(probs[len(prompt) - 1 + offset, token])
    return total


def test_multi_token_target_is_the_product_of_token_probabilities():
    for family in ("gpt2", "llama", "gemma3_text"):
        model = tiny_model(family, n_layers=2)
        prompts = [[11, 12, 13], [21, 22, 23, 24, 25], [31]]
        targets = [[101, 102, 103], [201], [301, 302]]
        got = target_log_probs(model, prompts, targets, batch_size=2).exp()
        expected = [_manual_log_prob(model, p, t) for p, t in zip(prompts, targets, strict=True)]
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-12)


def test_next_token_distribution_matches_full_forward():
    model = tiny_model("gpt2", n_layers=2)
    prompts = [[5, 6, 7], [8, 9]]
    got = next_token_log_probs(model, prompts)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(got[row], torch.log_softmax(logits, -1), rtol=1e-4, atol=1e-5)
