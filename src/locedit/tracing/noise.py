"""Subject noise of Causal Tracing (paper §3.2): calibration and a self-removing hook.

The same noise tensor is used for every restoration of one fact, for Tracing Reversal's
o_noise and for Fact Forcing's noised input, so all three see the identical s_noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from locedit.models.architecture import embedding_module


def noise_sigma(subject_embeddings: Sequence[torch.Tensor], multiplier: float = 3.0) -> float:
    """sigma = multiplier x std of subject-token input embeddings (ROME's rule, 3 x std).

    ``subject_embeddings`` are the embedding-layer outputs at the subject tokens of each fact;
    the standard deviation is over every coordinate of every subject token together.
    """
    if not subject_embeddings:
        raise ValueError("noise calibration needs at least one fact's subject embeddings")
    flat = torch.cat([e.reshape(-1).double() for e in subject_embeddings])
    return float(multiplier * flat.std())


def fact_seed(seed: int, fact_id: str) -> int:
    """A stable per-fact seed, independent of the order facts are processed in."""
    digest = hashlib.sha256(f"{seed}:{fact_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def subject_noise(
    n_samples: int, n_subject_tokens: int, d_model: int, sigma: float, seed: int
) -> torch.Tensor:
    """Gaussian noise [n_samples, n_subject_tokens, d_model] from a dedicated generator."""
    generator = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(n_samples, n_subject_tokens, d_model, generator=generator)


@contextmanager
def noised_subject(
    model: nn.Module, subject_start: int, subject_end: int, noise: torch.Tensor
) -> Iterator[None]:
    """Add ``noise`` to the embedding outputs at positions [subject_start, subject_end).

    ``noise`` is [batch, n_subject_tokens, d_model] (or without the batch axis, broadcast to
    every row). The hook is removed on exit, also when the body raises.
    """

    def add_noise(_module, _inputs, output):
        patched = output.clone()
        patched[:, subject_start:subject_end] += noise.to(output.dtype)
        return patched

    handle = embedding_module(model).register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()
