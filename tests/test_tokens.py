"""Subject spans and target tokens across tokenizer conventions (DESIGN.md §8, tokenization)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from locedit.models.tokens import TokenizationError, encode_prompt, encode_target
from locedit.testing import gpt2_tokenizer

CORPUS = [
    "The Eiffel Tower is located in Paris",
    "Danielle Darrieux speaks French",
    "Toko Yasuda plays the guitar",
    "Paris is the capital of France and Rome the capital of Italy",
] * 5


def _sentencepiece_like(bos: str = "<bos>") -> PreTrainedTokenizerFast:
    """A BPE tokenizer with Metaspace spaces and a BOS token, like Llama and Gemma."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", bos, "<eos>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<eos>", unk_token="<unk>")


TOKENIZERS = {"gpt2": gpt2_tokenizer, "sentencepiece_bos": _sentencepiece_like}


@pytest.fixture(params=list(TOKENIZERS))
def any_tokenizer(request):
    return TOKENIZERS[request.param]()


@pytest.mark.parametrize(
    "prompt, subject",
    [
        ("The Eiffel Tower is located in", "Eiffel Tower"),
        ("Danielle Darrieux speaks", "Danielle Darrieux"),  # subject is the first token
        ("The capital of France is Paris and Paris is", "Paris"),  # first occurrence wins
    ],
)
def test_subject_span_decodes_to_the_subject(any_tokenizer, prompt, subject):
    enc = encode_prompt(any_tokenizer, prompt, subject)
    text = any_tokenizer.decode(enc.input_ids[enc.subject_start : enc.subject_end])
    assert text.strip() == subject
    prefix = any_tokenizer.decode(enc.input_ids[: enc.subject_start], skip_special_tokens=True)
    assert prompt.startswith(prefix.strip() if prefix.strip() else "")
    assert prefix.strip() == prompt[: prompt.find(subject)].strip()


def test_bos_comes_before_a_first_token_subject():
    tok = _sentencepiece_like()
    enc = encode_prompt(tok, "Danielle Darrieux speaks", "Danielle Darrieux")
    assert enc.input_ids[0] == tok.bos_token_id
    assert enc.subject_start == 1
    gpt2 = encode_prompt(gpt2_tokenizer(), "Danielle Darrieux speaks", "Danielle Darrieux")
    assert gpt2.subject_start == 0


def test_target_tokens_continue_the_prompt(any_tokenizer):
    prompt = "The Eiffel Tower is located in"
    ids = encode_target(any_tokenizer, prompt, "Paris")
    prompt_ids = any_tokenizer(prompt)["input_ids"]
    assert any_tokenizer.decode(prompt_ids + ids, skip_special_tokens=True) == prompt + " Paris"
    assert any_tokenizer.bos_token_id not in ids


def test_gpt2_target_has_the_leading_space_token():
    tok = gpt2_tokenizer()
    assert encode_target(tok, "The Eiffel Tower is in", "Paris") == tok(" Paris")["input_ids"]


def test_bad_inputs_raise_clear_errors(any_tokenizer):
    with pytest.raises(TokenizationError, match="does not occur"):
        encode_prompt(any_tokenizer, "The tower is tall", "Eiffel")
    with pytest.raises(TokenizationError, match="empty subject"):
        encode_prompt(any_tokenizer, "The tower is tall", " ")
    with pytest.raises(TokenizationError, match="empty target"):
        encode_target(any_tokenizer, "The tower is in", "  ")
