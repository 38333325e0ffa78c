"""The prefix cache of the v*/z* optimisation (DESIGN.md §7): everything before each row's
lookup token is computed once, every optimisation step runs only the rest."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from locedit.editing.batch import EditBatch
from locedit.models.noise import positioned_noise


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

    @cached_property
    def kl_rows(self) -> torch.Tensor:
        """The KL rows' indices, worked out once: every optimisation step reads them, and on a
        GPU an index computed from data waits for the device."""
        return torch.nonzero(self.kl)[:, 0]

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
    device = batch.input_ids.device
    prefix = torch.full((size, width_prefix), pad_id, dtype=torch.long, device=device)
    suffix = torch.full((size, width_suffix), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((size, width_prefix + width_suffix), dtype=torch.long, device=device)
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


def merge_splits(splits: Sequence[SplitBatch], pad_id: int = 0) -> tuple[SplitBatch, list[int]]:
    """The rows of several split batches as one (independent edits optimised together), and
    each part's first row. Prefixes stay left-padded and suffixes right-padded to the widest
    part, so every real token keeps its position id and every lookup token sits at suffix
    position 0; ``n_target`` is the parts' largest (the caller keeps each part's own)."""
    width_prefix = max(s.n_prefix for s in splits)
    width_suffix = max(int(s.suffix_ids.shape[1]) for s in splits)
    size = sum(s.size for s in splits)
    device = splits[0].suffix_ids.device
    prefix = torch.full((size, width_prefix), pad_id, dtype=torch.long, device=device)
    suffix = torch.full((size, width_suffix), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((size, width_prefix + width_suffix), dtype=torch.long, device=device)
    offsets, noise_prefix, noise_suffix = [], [], []
    row = 0
    for s in splits:
        rows, shift = slice(row, row + s.size), width_prefix - s.n_prefix
        prefix[rows, shift:] = s.prefix_ids
        suffix[rows, : s.suffix_ids.shape[1]] = s.suffix_ids
        mask[rows, shift:width_prefix] = s.mask[:, : s.n_prefix]
        mask[rows, width_prefix : width_prefix + s.suffix_ids.shape[1]] = s.mask[:, s.n_prefix :]
        noise_prefix += [(r + row, start + shift, n) for r, start, n in s.noise_prefix]
        noise_suffix += [(r + row, start, n) for r, start, n in s.noise_suffix]
        offsets.append(row)
        row += s.size
    merged = SplitBatch(
        prefix_ids=prefix,
        suffix_ids=suffix,
        mask=mask,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0),
        target_rows=torch.cat([s.target_rows + o for s, o in zip(splits, offsets, strict=True)]),
        target_cols=torch.cat([s.target_cols for s in splits]),
        target_tokens=torch.cat([s.target_tokens for s in splits]),
        n_target=max(s.n_target for s in splits),
        rewrite=torch.cat([s.rewrite for s in splits]),
        bare=torch.cat([s.bare for s in splits]),
        kl=torch.cat([s.kl for s in splits]),
        noise_prefix=tuple(noise_prefix),
        noise_suffix=tuple(noise_suffix),
    )
    return merged, offsets
