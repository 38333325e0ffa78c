"""Probabilities an edit is judged on, measured before (once per fact) and after each edit.

A fact's probes cover every problem at once (o_false, o_true, o_noise on the prompt and the
paraphrases, o_false and o_true on the neighbours, the noised prompt for Fact Forcing), so the
unedited model is scored once per fact and reused for every layer, method and problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.data.records import Direction, FactRecord
from locedit.metrics import scores
from locedit.models.device import model_device
from locedit.models.noise import (
    SCORING_STREAM,
    NoiseConfig,
    d_model,
    fact_noise,
    fact_seed,
    noised_subject,
)
from locedit.models.scoring import target_log_probs
from locedit.models.tokens import TokenizationError, encode_prompt, encode_target


class ProblemSpec(Protocol):
    """What the metrics read of an editing problem (:class:`locedit.problems.ProblemSpec`):
    the object it edits, whether its input is noised, and its direction (Sec. 5.1)."""

    @property
    def target(self) -> str: ...

    @property
    def direction(self) -> Direction: ...

    @property
    def noised_input(self) -> bool: ...


@dataclass(frozen=True)
class Probe:
    """p(target | prompt), optionally with the fact's subject noise on the prompt."""

    key: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    subject_span: tuple[int, int] | None = None  # set when the subject is noised


def _object_strings(record: FactRecord, o_noise: str | None) -> dict[str, str]:
    objects = {"o_true": record.target_true}
    if record.target_new:
        objects["o_false"] = record.target_new
    if o_noise:
        objects["o_noise"] = o_noise
    return objects


def build_probes(
    tokenizer: PreTrainedTokenizerBase, record: FactRecord, o_noise: str | None, noised: bool
) -> list[Probe]:
    """Every probe any problem needs for this fact. Paraphrases that lose the subject are
    still scored (clean); they are only left out of the noised probes."""
    probes: list[Probe] = []
    objects = _object_strings(record, o_noise)
    prompts = {"rewrite": [record.prompt], "paraphrase": list(record.paraphrase_prompts)}
    for group, texts in prompts.items():
        for index, text in enumerate(texts):
            ids = tuple(tokenizer(text)["input_ids"])
            for name, obj in objects.items():
                probes.append(Probe(f"{group}/{index}/{name}", ids, tuple(encode_target(tokenizer, text, obj))))
            if noised:
                try:
                    enc = encode_prompt(tokenizer, text, record.subject)
                except TokenizationError:
                    continue
                target = tuple(encode_target(tokenizer, text, record.target_true))
                span = (enc.subject_start, enc.subject_end)
                probes.append(Probe(f"{group}/{index}/o_true_noised", tuple(enc.input_ids), target, span))
    for index, text in enumerate(record.neighborhood_prompts):
        ids = tuple(tokenizer(text)["input_ids"])
        for name in ("o_false", "o_true", "o_noise"):
            if name in objects:
                target = tuple(encode_target(tokenizer, text, objects[name]))
                probes.append(Probe(f"neighborhood/{index}/{name}", ids, target))
    return probes


#: Rows per forward of the probes (per copy, see :func:`copied_log_probs`).
PROBE_BATCH = 16


def copied_log_probs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    copies: int = 1,
    batch_size: int = PROBE_BATCH,
) -> torch.Tensor:
    """:func:`~locedit.models.scoring.target_log_probs` of ``copies`` copies of the pairs,
    [copies, n]: each forward holds ``copies`` equal blocks of the same chunk of at most
    ``batch_size`` pairs, block g for copy g (how :func:`locedit.editing.deltas.
    weight_deltas_by_group` measures G edits at once). One copy is target_log_probs itself."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        size = len(prompts[chunk])
        log_p = target_log_probs(
            model, list(prompts[chunk]) * copies, list(targets[chunk]) * copies,
            batch_size=size * copies,
        )
        out.append(log_p.view(copies, size))
    return torch.cat(out, 1) if out else torch.empty(copies, 0, device=model_device(model))


def probe_probabilities(
    model: nn.Module, probes: Sequence[Probe], record: FactRecord, noise: NoiseConfig | None
) -> dict[str, float]:
    """Probabilities of all probes; noised probes average over noise samples drawn from the
    scoring stream (:data:`~locedit.models.noise.SCORING_STREAM`): independent of the noise
    Fact Forcing's edit was optimised on, the same draws before and after every edit."""
    return copied_probe_probabilities(model, probes, record, noise, 1)[0]


def copied_probe_probabilities(
    model: nn.Module, probes: Sequence[Probe], record: FactRecord, noise: NoiseConfig | None,
    copies: int,
) -> list[dict[str, float]]:
    """:func:`probe_probabilities` for ``copies`` copies in the same forwards (see
    :func:`copied_log_probs`), one dict per copy."""
    clean = [p for p in probes if p.subject_span is None]
    out: list[dict[str, float]] = [{} for _ in range(copies)]
    if clean:
        log_p = copied_log_probs(
            model, [p.prompt_ids for p in clean], [p.target_ids for p in clean], copies
        )
        for values, row in zip(out, log_p.tolist(), strict=True):
            values.update({p.key: math.exp(v) for p, v in zip(clean, row, strict=True)})
    for probe in probes:
        if probe.subject_span is None:
            continue
        if noise is None:
            raise ValueError("noised probes need the tracing noise configuration")
        start, end = probe.subject_span
        tensor = fact_noise(
            record.fact_id, end - start, d_model(model), noise, SCORING_STREAM
        ).to(model_device(model))
        with noised_subject(model, start, end, tensor.repeat(copies, 1, 1)):  # sample per row
            log_p = copied_log_probs(
                model, [probe.prompt_ids] * noise.n_samples, [probe.target_ids] * noise.n_samples,
                copies, batch_size=noise.n_samples,
            )
        for values, mean in zip(out, log_p.exp().mean(1).tolist(), strict=True):
            values[probe.key] = mean
    return out


def _group(probs: dict[str, float], group: str, name: str) -> list[float]:
    """Values of ``group/<index>/name`` in index order (pre and post align by construction)."""
    items = []
    for key, value in probs.items():
        key_group, index, obj = key.split("/")
        if key_group == group and obj == name:
            items.append((int(index), value))
    return [value for _, value in sorted(items)]


#: Which object the neighbourhood score tracks: ``o_false`` for every problem (the paper's
#: text, "neighborhood is entirely identical") or ``problem``, the problem's own target (the
#: original evaluation code, which scores every prompt on the request's target).
NEIGHBORHOOD_TARGETS = ("o_false", "problem")


def score_edit(
    problem: ProblemSpec, target_name: str, pre: dict[str, float], post: dict[str, float],
    essence_before: float | None = None, essence_after: float | None = None,
    neighborhood_target: str = "o_false",
) -> dict[str, float]:
    """All metric columns for one edit (Sec. 3.4 and App. C).

    ``target_name`` is the probe object the problem edits (o_false, o_noise or o_true, with
    ``_noised`` for Fact Forcing). The neighbourhood score tracks o_false on s* for every
    problem, as the paper's text does ("neighborhood is entirely identical"), or with
    ``neighborhood_target="problem"`` the problem's own (clean) target, as the original code.
    """
    direction = problem.direction
    rewrite = scores.rewrite_score(pre[f"rewrite/0/{target_name}"], post[f"rewrite/0/{target_name}"], direction)
    paraphrase = scores.paraphrase_score(
        _group(pre, "paraphrase", target_name), _group(post, "paraphrase", target_name), direction
    )
    if neighborhood_target not in NEIGHBORHOOD_TARGETS:
        raise ValueError(
            f"neighborhood_target {neighborhood_target!r} not among {NEIGHBORHOOD_TARGETS}"
        )
    neighbour_object = "o_false" if any(k.endswith("/o_false") for k in pre) else "o_true"
    if neighborhood_target == "problem":
        neighbour_object = problem.target
    neighborhood = scores.neighborhood_score(
        _group(pre, "neighborhood", neighbour_object), _group(post, "neighborhood", neighbour_object)
    )
    row = {
        "rewrite_score": rewrite,
        "paraphrase_score": paraphrase,
        "neighborhood_score": neighborhood,
        "overall_score": scores.overall_score(rewrite, paraphrase, neighborhood),
        "p_target_pre": pre[f"rewrite/0/{target_name}"],
        "p_target_post": post[f"rewrite/0/{target_name}"],
    }
    if essence_before is not None and essence_after is not None:
        essence = scores.essence_score(essence_before, essence_after)
        row.update(
            essence_score=essence,
            ppl_essence_pre=essence_before,
            ppl_essence_post=essence_after,
            overall_score_with_essence=scores.overall_score(rewrite, paraphrase, neighborhood, essence),
        )
    row.update(_rome_unscaled(post))
    return row


def _rome_unscaled(post: dict[str, float]) -> dict[str, float]:
    """ROME's original metrics after the edit: magnitudes p(o_false) - p(o_true) and the
    share of prompts where the new object wins (neighbours: where the true object still wins)."""
    if not any(k.endswith("/o_false") for k in post):
        return {}
    row: dict[str, float] = {}
    for group, sign in (("rewrite", 1.0), ("paraphrase", 1.0), ("neighborhood", -1.0)):
        new, true = _group(post, group, "o_false"), _group(post, group, "o_true")
        diffs = [sign * scores.rome_magnitude(n, t) for n, t in zip(new, true, strict=True)]
        row[f"rome_{group}_prob_diff"] = sum(diffs) / len(diffs) if diffs else math.nan
        row[f"rome_{group}_success"] = sum(d > 0 for d in diffs) / len(diffs) if diffs else math.nan
    return row


@dataclass(frozen=True)
class EssenceTexts:
    """Samples from the unedited model given "{s} is a" (App. C), as token ids."""

    prompt_length: int
    sequences: tuple[tuple[int, ...], ...]


def sample_essence_texts(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, record: FactRecord,
    n_samples: int = 5, top_k: int = 5, max_new_tokens: int = 30, seed: int = 0,
) -> EssenceTexts:
    """Five top-k=5 samples, seeded per fact so a rerun draws the same texts."""
    prompt = f"{record.subject} is a"
    enc = tokenizer(prompt, return_tensors="pt").to(model_device(model))
    torch.manual_seed(fact_seed(seed, f"essence:{record.fact_id}"))  # seeds CUDA too
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        generated = model.generate(
            **enc, do_sample=True, top_k=top_k, top_p=None, temperature=None,
            max_new_tokens=max_new_tokens, num_return_sequences=n_samples, pad_token_id=pad,
        )
    length = enc["input_ids"].shape[1]
    sequences = []
    for row in generated.tolist():
        continuation = row[length:]
        if tokenizer.eos_token_id in continuation:
            continuation = continuation[: continuation.index(tokenizer.eos_token_id)]
        if continuation:
            sequences.append(tuple(row[:length] + continuation))
    return EssenceTexts(length, tuple(sequences))


#: Which tokens the essence perplexity averages over: the sampled ``continuation`` given the
#: prompt (ours) or the ``whole_text`` including "{s} is a" (the original code's perplexity of
#: the full sample; the first token has no prediction and is left out).
ESSENCE_SPANS = ("continuation", "whole_text")


def essence_perplexity(model: nn.Module, texts: EssenceTexts, span: str = "continuation") -> float:
    """Mean over samples of exp(mean NLL of the sampled continuation given the prompt), or with
    ``span="whole_text"`` of every token after the first (prompt included)."""
    return copied_essence_perplexity(model, texts, span, 1)[0]


def copied_essence_perplexity(
    model: nn.Module, texts: EssenceTexts, span: str, copies: int
) -> list[float]:
    """:func:`essence_perplexity` for ``copies`` copies in the same forwards, one per copy."""
    if span not in ESSENCE_SPANS:
        raise ValueError(f"essence span {span!r} not among {ESSENCE_SPANS}")
    if not texts.sequences:
        return [math.nan] * copies
    cut = texts.prompt_length if span == "continuation" else 1
    prompts = [seq[:cut] for seq in texts.sequences]
    continuations = [seq[cut:] for seq in texts.sequences]
    out = []
    for row in copied_log_probs(model, prompts, continuations, copies).tolist():
        ppl = [math.exp(-lp / len(c)) for lp, c in zip(row, continuations, strict=True)]
        out.append(sum(ppl) / len(ppl))
    return out


def target_probe_name(problem: ProblemSpec) -> str:
    return f"{problem.target}_noised" if problem.noised_input else problem.target


def noise_for_request(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, record: FactRecord, noise: NoiseConfig
) -> torch.Tensor:
    """Fact Forcing's edit input: the fact's noise over its subject tokens in the prompt."""
    enc = encode_prompt(tokenizer, record.prompt, record.subject)
    return fact_noise(record.fact_id, enc.subject_end - enc.subject_start, d_model(model), noise)

