"""What one fact looks like to tracing, and component patches built on the intervention toolkit.

A restoration (Causal Tracing, §3.2) or a zeroing (representation zeroing, App. B) replaces the
output of a component (MLP, attention, or the whole block = residual stream) at some token
positions. Both paths of tracing and the zeroing code patch through :func:`patched_components`
(:func:`locedit.models.hooks.edited_outputs` on the architecture table's component modules), so
the same module outputs are changed in the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import FactRecord, RecordError
from locedit.models.architecture import Component, component_module, n_layers
from locedit.models.device import model_device
from locedit.models.hooks import Edit, edited_outputs, hidden_of, recorded
from locedit.models.noise import NoiseSource, d_model, noised_subject, resolve_noise
from locedit.models.scoring import head_logits
from locedit.models.tokens import TokenizationError, encode_prompt, encode_target

KINDS: tuple[str, ...] = ("mlp", "attn", "resid")


class SkipFact(ValueError):
    """A fact that cannot be traced (empty or unmatched subject, empty target), with the reason."""


@dataclass(frozen=True)
class TracingInput:
    """A fact's prompt (s, r) followed by the teacher-forced object tokens.

    ``input_ids`` is the prompt plus all object tokens but the last, so one forward pass gives
    p(o_true | s, r) as the product of the object's token probabilities (DESIGN.md §4).
    """

    fact_id: str
    input_ids: tuple[int, ...]
    n_prompt: int
    subject_start: int
    subject_end: int
    target_ids: tuple[int, ...]
    tokens: tuple[str, ...]

    @property
    def target_positions(self) -> list[int]:
        """Positions whose next-token distribution scores an object token."""
        return [self.n_prompt - 1 + k for k in range(len(self.target_ids))]

    @property
    def n_subject(self) -> int:
        return self.subject_end - self.subject_start

    @property
    def last_subject(self) -> int:
        return self.subject_end - 1

    def result_fields(self, kind: str, window: int) -> dict:
        """The fields every per-fact tracing or zeroing result starts with."""
        return {
            "fact_id": self.fact_id,
            "kind": kind,
            "window": int(window),
            "tokens": self.tokens,
            "subject_start": self.subject_start,
            "subject_end": self.subject_end,
        }

    def ids(self, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([self.input_ids], dtype=torch.long, device=device).repeat(batch, 1)


def encode_fact(tokenizer: PreTrainedTokenizerBase, fact: FactRecord) -> TracingInput:
    """Tokenise a fact for tracing; raise :class:`SkipFact` with the reason when impossible."""
    try:
        fact.validate()
        encoded = encode_prompt(tokenizer, fact.prompt, fact.subject)
        target = encode_target(tokenizer, fact.prompt, fact.target_true)
    except (RecordError, TokenizationError) as err:
        raise SkipFact(str(err)) from err
    ids = list(encoded.input_ids) + list(target[:-1])
    tokens = tuple(tokenizer.decode([i]) for i in encoded.input_ids)
    return TracingInput(
        fact_id=fact.fact_id,
        input_ids=tuple(ids),
        n_prompt=len(encoded.input_ids),
        subject_start=encoded.subject_start,
        subject_end=encoded.subject_end,
        target_ids=tuple(target),
        tokens=tokens,
    )


def tracing_noise(
    model: nn.Module,
    inp: TracingInput,
    sigma: float | None,
    seed: int,
    n_samples: int,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """The fact's s_noise: ``noise`` when given (a tensor or a seeded function), else the one
    :func:`locedit.models.noise.fact_noise` that Tracing Reversal and Fact Forcing regenerate."""
    return resolve_noise(
        noise,
        fact_id=inp.fact_id,
        n_subject_tokens=inp.n_subject,
        width=d_model(model),
        sigma=sigma,
        seed=seed,
        n_samples=n_samples,
    ).to(model_device(model))


#: layer -> function that rewrites that layer's component output
Patch = Edit


@contextmanager
def patched_components(
    model: nn.Module, kind: Component, patches: Mapping[int, Patch]
) -> Iterator[None]:
    """Rewrite the ``kind`` output of each layer in ``patches``; hooks go away on exit."""
    modules = {layer: component_module(model, kind, layer) for layer in patches}
    with edited_outputs(modules, patches):
        yield


def set_positions(
    rows: torch.Tensor | slice, positions: Sequence[int] | int, value: torch.Tensor | float
) -> Patch:
    """A patch that writes ``value`` at ``positions`` of the given batch rows (a fresh tensor)."""

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        patched = hidden.clone()
        if isinstance(rows, slice):
            patched[rows, positions] = value
        else:
            index = rows if isinstance(positions, int) else rows[:, None]
            patched[index, positions] = value
        return patched

    return fn


@contextmanager
def captured_components(
    model: nn.Module, kind: Component, layers: Sequence[int]
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the ``kind`` output of ``layers`` during the body: {layer: [batch, seq, d]}."""
    modules = {layer: component_module(model, kind, layer) for layer in layers}
    with recorded(modules, lambda _inputs, output: hidden_of(output).detach().clone()) as store:
        yield store


def target_probs_from_logits(logits: torch.Tensor, target_ids: Sequence[int]) -> torch.Tensor:
    """p(o) per row from logits at the object positions [rows, n_target, vocab] (float64)."""
    logp = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
    index = torch.tensor(list(target_ids), dtype=torch.long, device=logits.device)[None, :, None].expand(
        logits.shape[0], -1, 1
    )
    return logp.gather(2, index)[..., 0].double().sum(-1).exp()


@torch.no_grad()
def target_probs_from_final(
    model: nn.Module, final_hidden: torch.Tensor, target_ids: Sequence[int], budget: int = 1 << 24
) -> torch.Tensor:
    """p(o) per row from final-norm hidden states at the object positions [rows, n_target, d].

    Computes the log-sum-exp over the vocabulary in vocabulary chunks, so the (large) output
    embedding is read once for all rows and the logits never exist in full; ``budget`` bounds
    the logits held at once (elements). Same numbers as :func:`target_probs_from_logits` on
    :func:`locedit.models.scoring.unembed` up to float rounding.
    """
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    rows, n_target, width = final_hidden.shape
    flat = final_hidden.reshape(rows * n_target, width).to(weight.dtype)
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32

    def logits_of(start: int, stop: int) -> torch.Tensor:
        logits = nn.functional.linear(
            flat, weight[start:stop], None if bias is None else bias[start:stop]
        )
        return head_logits(model, logits).to(compute)

    vocab = weight.shape[0]
    chunk = max(1024, budget // max(1, flat.shape[0]))
    device = flat.device
    lse = torch.full((flat.shape[0],), -torch.inf, dtype=compute, device=device)
    ids = torch.tensor(list(target_ids), dtype=torch.long, device=device).repeat(rows)
    picked = torch.zeros(flat.shape[0], dtype=compute, device=device)
    for start in range(0, vocab, chunk):
        stop = min(vocab, start + chunk)
        logits = logits_of(start, stop)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        # A mask, not the indices of the rows whose target is in this chunk: an index computed
        # from data (torch.nonzero) waits for the GPU, once per chunk.
        inside = (ids >= start) & (ids < stop)
        local = (ids - start).clamp(0, stop - start - 1)
        picked = torch.where(inside, logits.gather(1, local[:, None])[:, 0], picked)
    logp = (picked - lse).double().view(rows, n_target)
    return logp.sum(-1).exp()


def patched_target_probs(
    model: nn.Module,
    inp: TracingInput,
    noise: torch.Tensor | None,
    kind: Component,
    patches: Mapping[int, Patch],
) -> torch.Tensor:
    """p(o_true) per noise sample for one patched forward pass (ROME's ``trace_with_patch``).

    The straightforward way: the full model, logits at every position, one row per noise
    sample (one row without noise when ``noise`` is None).
    """
    batch = 1 if noise is None else noise.shape[0]
    with torch.no_grad(), patched_components(model, kind, patches):
        if noise is None:
            logits = model(input_ids=inp.ids(batch, model_device(model))).logits
        else:
            with noised_subject(model, inp.subject_start, inp.subject_end, noise):
                logits = model(input_ids=inp.ids(batch, model_device(model))).logits
    return target_probs_from_logits(logits[:, inp.target_positions], inp.target_ids)


def check_kind(kind: str) -> Component:
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind  # type: ignore[return-value]


def all_layers(model: nn.Module) -> list[int]:
    return list(range(n_layers(model)))
