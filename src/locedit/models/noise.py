"""The subject noise of Causal Tracing (paper §3.2), seeded per fact, and hooks that add it.

One fact's s_noise is the same tensor for every restoration of that fact, for Tracing
Reversal's o_noise and for Fact Forcing's noised input (§5.1), so all of them see the
identical noised subject. The noised probes that *judge* an edit (Fact Forcing's scores) draw
from a separate seed stream (:data:`SCORING_STREAM`): the edit is scored on noise it was not
optimised on, as the original evaluation draws fresh noise. It lives beside the intervention
toolkit (:mod:`locedit.models.hooks`) because tracing, problems, metrics and editing all add it.

A user who wants another implementation's noise passes it instead of sigma and seed: a tensor
[n_samples, n_subject_tokens, d_model], or a :data:`NoiseFn` called with that shape (e.g.
ROME's ``numpy.random.RandomState(1).randn`` scaled by its noise level).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from locedit.models.architecture import embedding_module
from locedit.models.hooks import edited_output

#: A seeded noise function: (n_samples, n_subject_tokens, d_model) -> noise of that shape.
NoiseFn = Callable[[int, int, int], torch.Tensor]

#: What the tracing entry points accept as the noise itself.
NoiseSource = torch.Tensor | NoiseFn


def fact_seed(seed: int, fact_id: str) -> int:
    """A stable per-fact seed, independent of the order facts are processed in."""
    digest = hashlib.sha256(f"{seed}:{fact_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def subject_noise(
    n_samples: int, n_subject_tokens: int, d_model: int, sigma: float, seed: int
) -> torch.Tensor:
    """Gaussian noise [n_samples, n_subject_tokens, d_model] from a dedicated generator.

    Drawn on the CPU (deliberately: the same seed gives the same noise on every device, so
    CPU and GPU runs trace and edit with identical noise); users move it to the model.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return sigma * torch.randn(
        n_samples, n_subject_tokens, d_model, generator=generator, device="cpu"
    )


def d_model(model: nn.Module) -> int:
    """Width of the input embeddings (where the subject noise is added)."""
    return int(embedding_module(model).weight.shape[1])


@dataclass(frozen=True)
class NoiseConfig:
    """The Causal Tracing noise, shared by tracing, Tracing Reversal, Fact Forcing and the
    noised metric probes: sigma, the number of samples and the run's seed."""

    sigma: float
    n_samples: int = 10
    seed: int = 0


#: The seed stream of the noise that scores edits (independent of tracing's and training's).
SCORING_STREAM = "score"


def noise_seed(seed: int, fact_id: str, stream: str | None = None) -> int:
    """The generator seed of a fact's noise: ``stream`` None is the tracing/training noise
    (:func:`fact_seed` of the run seed and fact id, unchanged), any other stream an independent
    draw (the fact id prefixed by ``"<stream>:"``)."""
    return fact_seed(seed, fact_id if stream is None else f"{stream}:{fact_id}")


def fact_noise(
    fact_id: str, n_subject_tokens: int, width: int, noise: NoiseConfig, stream: str | None = None
) -> torch.Tensor:
    """The fact's s_noise [n_samples, n_subject_tokens, width]: the one tensor tracing, Tracing
    Reversal and Fact Forcing's edit input see (seeded by :func:`fact_seed` of the run seed and
    fact id); ``stream`` (e.g. :data:`SCORING_STREAM`) gives independent draws instead."""
    return subject_noise(
        noise.n_samples, n_subject_tokens, width, noise.sigma,
        noise_seed(noise.seed, fact_id, stream),
    )


def resolve_noise(
    source: NoiseSource | None,
    *,
    fact_id: str,
    n_subject_tokens: int,
    width: int,
    sigma: float | None,
    seed: int,
    n_samples: int,
) -> torch.Tensor:
    """The noise tensor for one fact: ``source`` itself, ``source(n_samples, n_subject_tokens,
    width)``, or (``source`` None) :func:`fact_noise` from ``sigma`` and ``seed``."""
    if source is None:
        if sigma is None:
            raise ValueError("give the noise level sigma, or the noise itself")
        return fact_noise(fact_id, n_subject_tokens, width, NoiseConfig(sigma, n_samples, seed))
    tensor = (
        source if isinstance(source, torch.Tensor) else source(n_samples, n_subject_tokens, width)
    )
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.as_tensor(tensor, device="cpu")
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (n_subject_tokens, width):
        raise ValueError(
            f"noise must be [n_samples, {n_subject_tokens}, {width}] for fact {fact_id!r}, "
            f"got {tuple(tensor.shape)}"
        )
    return tensor


@contextmanager
def noised_subject(
    model: nn.Module, subject_start: int, subject_end: int, noise: torch.Tensor
) -> Iterator[None]:
    """Add ``noise`` to the embedding outputs at positions [subject_start, subject_end).

    ``noise`` is [batch, n_subject_tokens, d_model] (or without the batch axis, broadcast to
    every row). The hook is removed on exit, also when the body raises.
    """

    def add_noise(output: torch.Tensor) -> torch.Tensor:
        patched = output.clone()
        patched[:, subject_start:subject_end] += noise.to(device=output.device, dtype=output.dtype)
        return patched

    with edited_output(embedding_module(model), add_noise):
        yield


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
            first = members[0][1]
            per_row = torch.zeros(
                size, n_tok, int(first.shape[-1]), dtype=first.dtype, device=first.device
            )
            for row, noise in members:
                per_row[row] = noise
            stack.enter_context(noised_subject(model, start, start + n_tok, per_row))
        yield
