"""The prompts an edit optimises over, and forward passes that redo only what changes.

An edit's batch holds the rewriting rows (context template + prompt + all but the last target
token) and the KL rows ("{subject} is a"). Every row knows where its subject ends (the
lookup token of ROME/MEMIT), which positions predict target tokens, and which noise sample
it carries when the request has a noised subject.

Speed (DESIGN.md §7): layers below the edited one never change during an optimisation, so
their outputs are computed once and replayed; logits are computed only at target and KL
positions, never over the whole sequence.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.editing.types import Direction, EditRequest
from locedit.models.architecture import arch_spec, get_module
from locedit.models.scoring import pad_token_id, unembed
from locedit.models.tokens import TokenizationError, encode_target
from locedit.tracing.noise import noised_subject

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
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    t_rows, t_cols, t_tokens = [], [], []
    for i, row in enumerate(rows):
        input_ids[i, : len(row["ids"])] = torch.tensor(row["ids"], dtype=torch.long)
        mask[i, : len(row["ids"])] = 1
        if row["rewrite"]:
            for offset, token in enumerate(target_ids):
                t_rows.append(i)
                t_cols.append(row["prompt_len"] - 1 + offset)
                t_tokens.append(token)
    return EditBatch(
        input_ids=input_ids,
        attention_mask=mask,
        lookup=torch.tensor([r["end"] - 1 for r in rows], dtype=torch.long),
        subject_start=tuple(r["start"] for r in rows),
        subject_len=tuple(r["end"] - r["start"] for r in rows),
        rewrite=torch.tensor([r["rewrite"] for r in rows]),
        bare=torch.tensor([r["bare"] for r in rows]),
        kl=torch.tensor([not r["rewrite"] for r in rows]),
        target_rows=torch.tensor(t_rows, dtype=torch.long),
        target_cols=torch.tensor(t_cols, dtype=torch.long),
        target_tokens=torch.tensor(t_tokens, dtype=torch.long),
        n_target=len(target_ids),
        noise=noise,
        noise_sample=tuple(r["sample"] for r in rows),
        template=tuple(r["template"] for r in rows),
    )


@contextmanager
def batch_noise(model: nn.Module, batch: EditBatch) -> Iterator[None]:
    """Apply each row's s_noise at its subject tokens through :func:`noised_subject`."""
    if batch.noise is None:
        yield
        return
    entries = [
        (row, batch.subject_start[row], batch.noise[sample])
        for row, sample in enumerate(batch.noise_sample)
        if sample is not None
    ]
    with positioned_noise(model, entries, batch.size):
        yield


def hidden_states(model: nn.Module, batch: EditBatch) -> torch.Tensor:
    """Final-norm hidden states of the base model for the batch (noise applied)."""
    with batch_noise(model, batch):
        return model.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state


class _StopForward(Exception):
    """Raised by a hook once everything a forward was run for has been seen."""


def run_until(model: nn.Module, batch: EditBatch, module: nn.Module) -> None:
    """Forward the batch (no grad, noise applied) only as far as ``module``."""
    _run_until(lambda: hidden_states(model, batch), module)


def _run_until(forward: Callable[[], object], module: nn.Module) -> None:
    def stop(_module, _inputs, _output):
        raise _StopForward

    handle = module.register_forward_hook(stop)
    try:
        with torch.no_grad():
            forward()
    except _StopForward:
        pass
    finally:
        handle.remove()


def target_log_probs(model: nn.Module, hidden: torch.Tensor, batch: EditBatch) -> torch.Tensor:
    """Summed log p(target) per rewriting row, unembedding only the predicting positions."""
    logits = unembed(model, hidden[batch.target_rows, batch.target_cols]).float()
    picked = torch.log_softmax(logits, dim=-1).gather(1, batch.target_tokens[:, None])[:, 0]
    totals = torch.zeros(batch.size, dtype=picked.dtype).index_add(0, batch.target_rows, picked)
    return totals[batch.rewrite]


def objective(
    row_log_probs: torch.Tensor, n_target: int, direction: Direction
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean NLL per target token) for the problem's direction.

    Maximising minimises the NLL per target token averaged over rows (ROME's ``compute_v``);
    minimising (Fact Erasure) minimises exp(-NLL), the geometric-mean token probability, as
    the paper's code does.
    """
    nll = (-row_log_probs / n_target).mean()
    return (nll if direction == "maximize" else torch.exp(-nll)), nll


def _first_output(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first_output(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


@contextmanager
def recorded_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, object]]:
    """Record each module's (first) forward output, detached, keyed by name."""
    records: dict[str, object] = {}
    handles = []

    def hook(name, _module, _inputs, output):
        if name not in records:
            records[name] = _detach(output)

    for name, module in modules.items():
        handles.append(module.register_forward_hook(functools.partial(hook, name)))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _detach(output):
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detach(o) for o in output)
    return output


@contextmanager
def captured_io(module: nn.Module, positions: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """The module's input and output at one position per row, from the first forward.

    Used on a down-projection: its input is the MLP key k, its output the value W k + b.
    """
    found: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        if "input" in found:
            return
        rows = torch.arange(inputs[0].shape[0])
        found["input"] = inputs[0][rows, positions].detach()
        found["output"] = _first_output(output)[rows, positions].detach()

    handle = module.register_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def layer_modules(model: nn.Module) -> list[nn.Module]:
    return list(get_module(model, arch_spec(model).layers))


@contextmanager
def frozen_layers(model: nn.Module, forward: Callable[[], object], n_frozen: int) -> Iterator[None]:
    """Run layers ``0 .. n_frozen - 1`` once through ``forward``, then replay their outputs.

    Inside the block every call of ``forward`` (the same inputs each time) recomputes only the
    layers from ``n_frozen`` on. Valid while those lower layers' weights and the inputs stay
    unchanged, which holds during an optimisation of a layer at or above ``n_frozen``. Forward
    hooks on the frozen layers still run on the replayed output.
    """
    layers = layer_modules(model)[:n_frozen]
    if not layers:
        yield
        return
    names = {str(i): layer for i, layer in enumerate(layers)}
    with recorded_outputs(names) as records:
        _run_until(forward, layers[-1])
    patched: list[nn.Module] = []
    try:
        for i, layer in enumerate(layers):
            layer.forward = functools.partial(_replay, records[str(i)])
            patched.append(layer)
        yield
    finally:
        for layer in patched:
            del layer.forward


def _replay(output, *_args, **_kwargs):
    return output


@contextmanager
def added_at(
    module: nn.Module, positions: torch.Tensor, width: int, delta: torch.Tensor
) -> Iterator[dict]:
    """Add ``delta`` to the module's output at one position per row (out of place).

    Yields a dict that receives ``init``: the unchanged output at those positions in the
    first forward, [B, d_model].
    """
    size = int(positions.shape[0])
    rows = torch.arange(size)
    mask = torch.zeros(size, width, 1)
    mask[rows, positions] = 1.0
    state: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        value = _first_output(output)
        if "init" not in state:
            state["init"] = value[rows, positions].detach().clone()
        return _with_first_output(output, value + mask.to(value.dtype) * delta.to(value.dtype))

    handle = module.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


@dataclass(frozen=True)
class SplitBatch:
    """The batch cut just before each row's lookup token, rows aligned at the cut.

    Everything before the lookup token is unaffected by a vector added at the lookup token, so
    its keys and values are computed once (the prefix, left-padded to a common length P) and
    every optimisation step runs only the suffix (lookup token onwards) against a copy of that
    cache. Real tokens keep their original position ids.
    """

    prefix_ids: torch.Tensor  # [B, P]
    suffix_ids: torch.Tensor  # [B, S]
    mask: torch.Tensor  # [B, P + S]
    position_ids: torch.Tensor  # [B, P + S]
    target_rows: torch.Tensor
    target_cols: torch.Tensor  # in suffix coordinates
    target_tokens: torch.Tensor
    n_target: int
    rewrite: torch.Tensor
    bare: torch.Tensor
    kl: torch.Tensor
    noise_prefix: tuple  # (row, start, noise[n, d]) in prefix coordinates
    noise_suffix: tuple  # (row, start, noise[n, d]) in suffix coordinates

    @property
    def size(self) -> int:
        return int(self.suffix_ids.shape[0])

    @property
    def n_prefix(self) -> int:
        return int(self.prefix_ids.shape[1])


def split_batch(batch: EditBatch, pad_id: int = 0) -> SplitBatch:
    """Cut every row of ``batch`` at its lookup token (see :class:`SplitBatch`)."""
    lengths = batch.attention_mask.sum(1).tolist()
    cuts = batch.lookup.tolist()
    width_prefix = max(cuts)
    width_suffix = max(n - c for n, c in zip(lengths, cuts, strict=True))
    size = batch.size
    prefix = torch.full((size, width_prefix), pad_id, dtype=torch.long)
    suffix = torch.full((size, width_suffix), pad_id, dtype=torch.long)
    mask = torch.zeros((size, width_prefix + width_suffix), dtype=torch.long)
    noise_prefix, noise_suffix = [], []
    for row, (n, cut) in enumerate(zip(lengths, cuts, strict=True)):
        ids = batch.input_ids[row, :n]
        prefix[row, width_prefix - cut :] = ids[:cut]
        suffix[row, : n - cut] = ids[cut:]
        mask[row, width_prefix - cut : width_prefix + n - cut] = 1
        sample = batch.noise_sample[row]
        if sample is not None:
            noise = batch.noise[sample]
            start = batch.subject_start[row]
            if cut > start:  # the subject's tokens before the lookup token
                noise_prefix.append((row, width_prefix - cut + start, noise[: cut - start]))
            noise_suffix.append((row, 0, noise[cut - start : cut - start + 1]))
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return SplitBatch(
        prefix_ids=prefix,
        suffix_ids=suffix,
        mask=mask,
        position_ids=position_ids,
        target_rows=batch.target_rows,
        target_cols=batch.target_cols - batch.lookup[batch.target_rows],
        target_tokens=batch.target_tokens,
        n_target=batch.n_target,
        rewrite=batch.rewrite,
        bare=batch.bare,
        kl=batch.kl,
        noise_prefix=tuple(noise_prefix),
        noise_suffix=tuple(noise_suffix),
    )


@contextmanager
def positioned_noise(model: nn.Module, entries: Sequence[tuple], size: int) -> Iterator[None]:
    """Add per-row noise at per-row positions through :func:`noised_subject`.

    ``entries`` are (row, start, noise[n_tok, d]); rows sharing (start, n_tok) share one hook,
    the other rows of that hook get zeros (adding zero is exact).
    """
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for row, start, noise in entries:
        groups.setdefault((start, int(noise.shape[0])), []).append((row, noise))
    with ExitStack() as stack:
        for (start, n_tok), members in sorted(groups.items()):
            per_row = torch.zeros(
                size, n_tok, int(members[0][1].shape[-1]), dtype=members[0][1].dtype
            )
            for row, noise in members:
                per_row[row] = noise
            stack.enter_context(noised_subject(model, start, start + n_tok, per_row))
        yield


def _cache_of(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


class PrefixCachedForward:
    """Hidden states of a :class:`SplitBatch`'s suffix, with the prefix computed once.

    The prefix runs on construction (no grad, its noise applied); each call runs the suffix on
    a fresh copy of the prefix's key/value cache and returns final-norm hidden states [B, S, d].
    """

    def __init__(self, model: nn.Module, split: SplitBatch) -> None:
        self.model = model
        self.split = split
        self.cache = None
        if split.n_prefix:
            with torch.no_grad(), positioned_noise(model, split.noise_prefix, split.size):
                output = model.base_model(
                    input_ids=split.prefix_ids,
                    attention_mask=split.mask[:, : split.n_prefix],
                    position_ids=split.position_ids[:, : split.n_prefix],
                    use_cache=True,
                )
            self.cache = _cache_of(output)

    def __call__(self) -> torch.Tensor:
        split = self.split
        kwargs = {}
        if self.cache is not None:
            kwargs["cache"] = copy.deepcopy(self.cache)
        with positioned_noise(self.model, split.noise_suffix, split.size):
            return self.model.base_model(
                input_ids=split.suffix_ids,
                attention_mask=split.mask,
                position_ids=split.position_ids[:, split.n_prefix :],
                use_cache=self.cache is not None,
                **kwargs,
            ).last_hidden_state


def split_log_probs(
    model: nn.Module, hidden: torch.Tensor, split: SplitBatch, with_kl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed log p(target) per rewriting row, and the KL rows' next-token log-distribution.

    The KL distribution is read at the lookup token (suffix position 0) of each KL row, as
    ROME does. Both come from one unembedding call: at a few dozen positions the cost is
    reading the vocabulary matrix, so one read instead of two halves it.
    """
    kl_rows = torch.nonzero(split.kl)[:, 0] if with_kl else torch.zeros(0, dtype=torch.long)
    rows = torch.cat([split.target_rows, kl_rows])
    cols = torch.cat([split.target_cols, torch.zeros_like(kl_rows)])
    log_probs = torch.log_softmax(unembed(model, hidden[rows, cols]).float(), dim=-1)
    n_targets = int(split.target_rows.shape[0])
    picked = log_probs[:n_targets].gather(1, split.target_tokens[:, None])[:, 0]
    totals = torch.zeros(split.size, dtype=picked.dtype).index_add(0, split.target_rows, picked)
    return totals[split.rewrite], (log_probs[n_targets:] if with_kl else None)


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
        hp.noise_per_template,
    )
