"""Tokenisation rules shared by every stage: subject spans and target tokens.

Tokenizers differ in whether they add BOS, how they mark a leading space and whether they
merge across a word boundary. Everything here goes through character offsets of the real
tokenizer, so one rule serves GPT-2 BPE, Llama and Gemma sentencepiece alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


class TokenizationError(ValueError):
    """A prompt, subject or target that cannot be tokenised as the paper needs."""


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of a prompt with the half-open token span of its subject."""

    input_ids: list[int]
    subject_start: int
    subject_end: int

    @property
    def last_subject_index(self) -> int:
        return self.subject_end - 1


def _content_offsets(enc) -> list[tuple[int, int] | None]:
    """Offsets with special tokens (BOS/EOS) mapped to ``None``."""
    return [
        None if special or start == end else (start, end)
        for (start, end), special in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
    ]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> EncodedPrompt:
    """Encode ``prompt`` and locate the tokens that overlap the first occurrence of ``subject``."""
    if not subject or not subject.strip():
        raise TokenizationError("empty subject")
    char_start = prompt.find(subject)
    if char_start < 0:
        raise TokenizationError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    char_end = char_start + len(subject)
    if not tokenizer.is_fast:
        raise TokenizationError("locedit needs a fast tokenizer (it reads character offsets)")
    enc = tokenizer(prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
    token_ids = list(enc["input_ids"])
    covered = [
        i
        for i, span in enumerate(_content_offsets(enc))
        if span is not None and span[0] < char_end and span[1] > char_start
    ]
    if not covered:
        raise TokenizationError(f"subject {subject!r} maps to no token of {prompt!r}")
    return EncodedPrompt(token_ids, covered[0], covered[-1] + 1)


def encode_target(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as the model would continue ``prompt`` with it.

    The target is appended with one leading space (the CounterFact convention) and its tokens
    are read off the joint encoding, so the tokenizer decides how that space is marked.
    """
    target = target.strip()
    if not target:
        raise TokenizationError("empty target")
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(f"{prompt} {target}")["input_ids"]
    n_prompt = len(prompt_ids)
    eos = tokenizer.eos_token_id
    # Tokenizers that append EOS (some Llama configs) would put it after the target.
    if eos is not None and prompt_ids and prompt_ids[-1] == eos:
        n_prompt -= 1
        joint = joint[:-1]
    if joint[:n_prompt] != prompt_ids[:n_prompt]:
        # The boundary merged; fall back to encoding the target on its own with a space.
        ids = tokenizer(f" {target}", add_special_tokens=False)["input_ids"]
    else:
        ids = joint[n_prompt:]
    if not ids:
        raise TokenizationError(f"target {target!r} tokenizes to nothing")
    return list(ids)
