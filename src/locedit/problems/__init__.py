"""The five editing problems of the paper (Sec. 5.1): input, target and objective direction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import Direction, FactRecord
from locedit.models.noise import NoiseConfig, d_model, fact_noise, noised_subject
from locedit.models.scoring import next_token_log_probs
from locedit.models.tokens import TokenizationError, encode_prompt, encode_target

TargetKind = Literal["o_false", "o_noise", "o_true"]


@dataclass(frozen=True)
class EditingProblem:
    """What an edit optimises: which object, on which input, in which direction."""

    name: str
    target: TargetKind
    direction: Direction
    noised_input: bool = False
    needs_erasure_ok: bool = False


PROBLEMS: dict[str, EditingProblem] = {
    "error_injection": EditingProblem("error_injection", "o_false", "maximize"),
    "tracing_reversal": EditingProblem("tracing_reversal", "o_noise", "maximize"),
    "fact_erasure": EditingProblem("fact_erasure", "o_true", "minimize", needs_erasure_ok=True),
    "fact_amplification": EditingProblem("fact_amplification", "o_true", "maximize"),
    "fact_forcing": EditingProblem("fact_forcing", "o_true", "maximize", noised_input=True),
}


class ProblemNotApplicable(ValueError):
    """A fact that a problem does not apply to (e.g. Fact Erasure with p(o_true) < 0.02)."""


def get_problem(name: str) -> EditingProblem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown editing problem {name!r}; choose from {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def noised_next_token_probs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, record: FactRecord, noise: NoiseConfig
) -> torch.Tensor:
    """p(next token | s_noise, r) averaged over the noise samples: [vocab]."""
    enc = encode_prompt(tokenizer, record.prompt, record.subject)
    tensor = fact_noise(record.fact_id, enc.subject_end - enc.subject_start, d_model(model), noise)
    with noised_subject(model, enc.subject_start, enc.subject_end, tensor):
        log_p = next_token_log_probs(model, [enc.input_ids] * noise.n_samples)
    return log_p.exp().mean(0)


def compute_o_noise(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    record: FactRecord,
    noise: NoiseConfig,
    max_candidates: int = 200,
) -> str:
    """o_noise: the top-1 next word under the noised prompt (Sec. 5.1), chosen deterministically.

    Candidates are read in order of probability (mean over noise samples), never sampled and
    never containing prompt text. A candidate counts only if it is a whole word that encodes
    back to the same single token after the prompt, so it can serve as an edit target; a
    candidate equal to o_true's first token is passed over for the next most likely one.
    """
    probs = noised_next_token_probs(model, tokenizer, record, noise)
    true_first = encode_target(tokenizer, record.prompt, record.target_true)[0]
    for token in torch.argsort(probs, descending=True)[:max_candidates].tolist():
        if token == true_first or token in tokenizer.all_special_ids:
            continue
        word = tokenizer.decode([token]).strip()
        if not word or not any(ch.isalnum() for ch in word):
            continue
        try:
            if encode_target(tokenizer, record.prompt, word) == [token]:
                return word
        except TokenizationError:
            continue
    raise ProblemNotApplicable(f"no usable o_noise among the top {max_candidates} tokens")


def edit_target(problem: EditingProblem, record: FactRecord, o_noise: str | None = None) -> str:
    """The object the edit moves the probability of."""
    if problem.needs_erasure_ok and not record.extra.get("erasure_ok", False):
        raise ProblemNotApplicable("Fact Erasure needs p(o_true | s, r) >= 0.02")
    if problem.target == "o_false":
        if not record.target_new:
            raise ProblemNotApplicable("record has no o_false (target_new)")
        return record.target_new
    if problem.target == "o_noise":
        if o_noise is None:
            raise ProblemNotApplicable("o_noise was not computed for this fact")
        return o_noise
    return record.target_true
