"""The prompts an edit optimises over (paper Sec. 5.2, App. A): one padded batch per request.

An edit's batch holds the rewriting rows (context template + prompt + all but the last target
token) and the KL rows ("{subject} is a"). Every row knows where its subject ends (the
lookup token of ROME/MEMIT), which positions predict target tokens, and which noise sample
it carries when the request has a noised subject.

How the batch runs lives in :mod:`locedit.editing.forward` (noise, forwards up to a module,
interventions at the lookup token) and :mod:`locedit.editing.prefix` (the prefix cache); the
objective in :mod:`locedit.editing.loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.editing.types import EditRequest
from locedit.models.device import model_device
from locedit.models.scoring import pad_token_id
from locedit.models.tokens import TokenizationError, encode_target

BARE_TEMPLATE = "{}"


@dataclass(frozen=True)
class EditBatch:
    """Right-padded rows with the index bookkeeping every method needs."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    lookup: torch.Tensor  # [B] last subject token per row
    subject_start: tuple[int, ...]
    subject_len: tuple[int, ...]
    rewrite: torch.Tensor  # [B] bool: rows that carry the target
    bare: torch.Tensor  # [B] bool: rewriting rows of the prompt without a template
    kl: torch.Tensor  # [B] bool: KL rows
    target_rows: torch.Tensor  # [n] row of each predicted target token
    target_cols: torch.Tensor  # [n] position whose logits predict it
    target_tokens: torch.Tensor  # [n]
    n_target: int
    noise: torch.Tensor | None  # [n_samples, n_subject_tokens, d_model]
    noise_sample: tuple[int | None, ...]  # per row
    template: tuple[int | None, ...]  # context template of each rewriting row (None: KL row)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_rewrite(self) -> int:
        return int(self.rewrite.sum())


def template_mean(values: torch.Tensor, batch: EditBatch) -> torch.Tensor:
    """Mean over context templates of the per-template mean over rows (noise samples).

    ROME averages the key over templates; with a noised subject a template may carry several
    rows, and each template still counts once.
    """
    groups: dict[int, list[int]] = {}
    for row, template in enumerate(batch.template):
        if template is not None:
            groups.setdefault(template, []).append(row)
    return torch.stack([values[rows].mean(0) for _, rows in sorted(groups.items())]).mean(0)


def memit_key_mean(values: torch.Tensor, batch: EditBatch) -> torch.Tensor:
    """MEMIT's key average (``compute_ks`` of kmeng01/memit): the mean of two group means.

    The original groups its context templates as ``[["{}"], [t_1, ..., t_n]]``, averages the
    keys within each group and then over the groups, so the bare prompt weighs 1/2 and each of
    the n templated prompts 1/(2n). (ROME's ``compute_u`` instead averages every template
    equally, :func:`template_mean`.) Without templated rows the bare-prompt key is returned.
    """
    per_template = {}
    groups: dict[int, list[int]] = {}
    for row, template in enumerate(batch.template):
        if template is not None:
            groups.setdefault(template, []).append(row)
    for template, rows in groups.items():
        per_template[template] = values[rows].mean(0)
    bare = per_template.pop(0)
    if not per_template:
        return bare
    templated = torch.stack([per_template[t] for t in sorted(per_template)]).mean(0)
    return (bare + templated) / 2


def encode_span(
    tokenizer: PreTrainedTokenizerBase, text: str, char_start: int, char_end: int
) -> tuple[list[int], int, int]:
    """Token ids of ``text`` and the half-open token span overlapping [char_start, char_end).

    Like :func:`locedit.models.tokens.encode_prompt`, but for a subject at a known character
    offset (a context template may contain the subject's words too). A trailing EOS that some
    tokenizers append is dropped, since the prompt continues.
    """
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    special = list(enc["special_tokens_mask"])
    if len(ids) > 1 and special[-1] and ids[-1] == tokenizer.eos_token_id:
        ids, offsets, special = ids[:-1], offsets[:-1], special[:-1]
    covered = [
        i
        for i, ((start, end), sp) in enumerate(zip(offsets, special, strict=True))
        if not sp and start < end and start < char_end and end > char_start
    ]
    if not covered:
        raise TokenizationError(f"characters {char_start}:{char_end} map to no token of {text!r}")
    return ids, covered[0], covered[-1] + 1


def build_batch(
    tokenizer: PreTrainedTokenizerBase,
    request: EditRequest,
    target_ids: Sequence[int],
    templates: Sequence[str] = (BARE_TEMPLATE,),
    kl_prompts: Sequence[str] = (),
    pad_id: int = 0,
    noise_per_template: int | None = None,
    device: torch.device | str = "cpu",
) -> EditBatch:
    """Rows for ``templates`` (each a prefix followed by ``{}``) plus KL rows.

    With a noised subject every rewriting row is repeated once per noise sample, so the
    objective averages over the samples. ``noise_per_template`` = k gives each context template
    only k samples (cycling through all of them across templates) while the bare prompt keeps
    every sample: the cost grows by k instead of n_samples. A templated row whose subject
    tokenises to a different number of tokens than the bare prompt (a leading space can merge
    differently) cannot carry that noise and is left out. KL rows stay clean: they measure the
    model's unedited behaviour on the subject.
    """
    if not templates or templates[0] != BARE_TEMPLATE:
        raise ValueError("the first template must be the bare prompt '{}'")
    target_ids = list(target_ids)
    rows: list[dict] = []
    noise = request.subject_noise
    n_samples = 1 if noise is None else int(noise.shape[0])
    bare_len = None
    for index, template in enumerate(templates):
        if template.count("{}") != 1:
            raise ValueError(f"context template {template!r} must contain '{{}}' exactly once")
        prefix, suffix = template.split("{}")
        text = prefix + request.prompt + suffix
        start = len(prefix) + request.prompt.find(request.subject)
        ids, s_start, s_end = encode_span(tokenizer, text, start, start + len(request.subject))
        if index == 0:
            bare_len = s_end - s_start
            if noise is not None and noise.shape[1] != bare_len:
                raise ValueError(
                    f"subject_noise covers {noise.shape[1]} tokens but the subject "
                    f"{request.subject!r} has {bare_len} tokens in the prompt"
                )
        if noise is not None and s_end - s_start != bare_len:
            continue
        if index == 0 or noise_per_template is None:
            samples = list(range(n_samples))
        else:
            k = max(1, min(noise_per_template, n_samples))
            samples = [((index - 1) * k + j) % n_samples for j in range(k)]
        for sample in samples:
            rows.append(
                {
                    "ids": ids + target_ids[:-1],
                    "start": s_start,
                    "end": s_end,
                    "prompt_len": len(ids),
                    "rewrite": True,
                    "bare": index == 0,
                    "sample": None if noise is None else sample,
                    "template": index,
                }
            )
    for kl_prompt in kl_prompts:
        text = kl_prompt.replace("{}", request.subject)
        start = kl_prompt.index("{}")
        ids, s_start, s_end = encode_span(tokenizer, text, start, start + len(request.subject))
        rows.append(
            {
                "ids": ids,
                "start": s_start,
                "end": s_end,
                "prompt_len": len(ids),
                "rewrite": False,
                "bare": False,
                "sample": None,
                "template": None,
            }
        )
    width = max(len(r["ids"]) for r in rows)
    # Built on the CPU row by row, then moved to ``device`` in one copy each.
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    t_rows, t_cols, t_tokens = [], [], []
    for i, row in enumerate(rows):
        input_ids[i, : len(row["ids"])] = torch.tensor(row["ids"], dtype=torch.long, device="cpu")
        mask[i, : len(row["ids"])] = 1
        if row["rewrite"]:
            for offset, token in enumerate(target_ids):
                t_rows.append(i)
                t_cols.append(row["prompt_len"] - 1 + offset)
                t_tokens.append(token)
    return EditBatch(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        lookup=torch.tensor([r["end"] - 1 for r in rows], dtype=torch.long, device=device),
        subject_start=tuple(r["start"] for r in rows),
        subject_len=tuple(r["end"] - r["start"] for r in rows),
        rewrite=torch.tensor([r["rewrite"] for r in rows], device=device),
        bare=torch.tensor([r["bare"] for r in rows], device=device),
        kl=torch.tensor([not r["rewrite"] for r in rows], device=device),
        target_rows=torch.tensor(t_rows, dtype=torch.long, device=device),
        target_cols=torch.tensor(t_cols, dtype=torch.long, device=device),
        target_tokens=torch.tensor(t_tokens, dtype=torch.long, device=device),
        n_target=len(target_ids),
        noise=None if noise is None else noise.to(device),
        noise_sample=tuple(r["sample"] for r in rows),
        template=tuple(r["template"] for r in rows),
    )


def request_batch(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, request: EditRequest,
    templates: Sequence[str], hp,
) -> EditBatch:
    """The v* batch ROME and MEMIT share: the request in every context template, plus the KL
    prompt when the KL term is on."""
    target_ids = encode_target(tokenizer, request.prompt, request.target)
    kl_prompts = [hp.kl_prompt] if hp.kl_factor else []
    return build_batch(
        tokenizer, request, target_ids, templates, kl_prompts, pad_token_id(model),
        hp.noise_per_template, model_device(model),
    )
