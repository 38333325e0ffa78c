"""Target probabilities by teacher forcing, with logits only where they are read.

Gemma's 262k-token unembedding costs more than all its layers together (DESIGN.md §7), so
every probability here runs the base model once and unembeds just the positions that predict
a target token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from locedit.models.architecture import text_config
from locedit.models.device import model_device


def logit_scale(model: nn.Module) -> float:
    """Factor some heads apply to the logits after the output embedding (Cohere, Granite)."""
    config = text_config(model)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    return scale / float(getattr(config, "logits_scaling", None) or 1.0)


def unembed(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final-layer hidden states (after the final norm), as the LM head does."""
    return head_logits(model, model.get_output_embeddings()(hidden))


def head_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What the LM head does after the output embedding: the logit scale (Cohere, Granite),
    then the soft-cap (Gemma 2), both from the text decoder's config."""
    scale = logit_scale(model)
    if scale != 1.0:
        logits = logits * scale
    softcap = getattr(text_config(model), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask on ``device``, so positions stay those of the
    unpadded prompt."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device="cpu")
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long, device="cpu")
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def pad_token_id(model: nn.Module) -> int:
    config = text_config(model)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def target_log_probs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> torch.Tensor:
    """log p(target | prompt) summed over target tokens, one value per (prompt, target) pair.

    The probability of a multi-token object is the product of its token probabilities under
    teacher forcing (DESIGN.md §4), so the log-probabilities add.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets must pair up")
    out: list[torch.Tensor] = []
    pad = pad_token_id(model)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            out.append(_log_probs_batch(model, [prompts[i] for i in chunk], [targets[i] for i in chunk], pad))
    return torch.cat(out) if out else torch.empty(0, device=model_device(model))


def _log_probs_batch(model, prompts, targets, pad: int) -> torch.Tensor:
    sequences = [list(p) + list(t[:-1]) for p, t in zip(prompts, targets, strict=True)]
    device = model_device(model)
    ids, mask = pad_right(sequences, pad, device)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows, cols, token_ids = [], [], []
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        for offset, token in enumerate(target):
            rows.append(row)
            cols.append(len(prompt) - 1 + offset)
            token_ids.append(token)
    rows_t = torch.tensor(rows, device=device)
    logits = unembed(model, hidden[rows_t, torch.tensor(cols, device=device)]).float()
    index = torch.tensor(token_ids, device=device)[:, None]
    picked = torch.log_softmax(logits, dim=-1).gather(1, index)[:, 0]
    totals = torch.zeros(len(prompts), dtype=picked.dtype, device=device)
    return totals.index_add(0, rows_t, picked)


def next_token_log_probs(model: nn.Module, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """log-softmax over the vocabulary at the last position of each prompt: [n, vocab]."""
    device = model_device(model)
    ids, mask = pad_right(prompts, pad_token_id(model), device)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        logits = unembed(model, hidden[torch.arange(len(prompts), device=device), last]).float()
    return torch.log_softmax(logits, dim=-1)
