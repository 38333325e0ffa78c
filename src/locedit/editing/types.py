"""What an editor is asked to do and what it reports back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from locedit.data.records import Direction


class EditFailed(RuntimeError):
    """An edit that had to be aborted (NaN/Inf loss or update, singular solve, ...).

    The model has already been restored when this propagates out of :func:`edited`.
    """

    def __init__(self, method: str, reason: str) -> None:
        super().__init__(f"{method} edit failed: {reason}")
        self.method = method
        self.reason = reason


@dataclass(frozen=True)
class EditRequest:
    """One edit: make ``target`` more (or less) likely after ``prompt``.

    ``prompt`` is the filled-in prompt (s, r) containing ``subject``. ``subject_noise`` is
    Fact Forcing's s_noise, [n_samples, n_subject_tokens, d_model] from
    :mod:`locedit.models.noise`; the edit's objective is then averaged over the samples.
    """

    prompt: str
    subject: str
    target: str
    direction: Direction = "maximize"
    subject_noise: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(f"direction must be 'maximize' or 'minimize', not {self.direction!r}")
        if self.subject not in self.prompt:
            raise ValueError(f"subject {self.subject!r} does not occur in prompt {self.prompt!r}")
        if not self.target.strip():
            raise ValueError("empty target")
        noise = self.subject_noise
        if noise is not None and (noise.ndim != 3 or noise.shape[0] < 1):
            raise ValueError(
                "subject_noise must be [n_samples, n_subject_tokens, d_model], "
                f"got shape {tuple(noise.shape)}"
            )


@dataclass(frozen=True)
class EditCall:
    """One edit as the editor hands it to a method's ``apply`` (see
    :mod:`locedit.editing.methods`): the model to edit in place, the request, the registry
    name it runs under, the edit layer and every layer the method's window touches, its
    hyperparameters, the key statistics and context templates (methods that need them), and
    the requests co-edited with it (methods with a ``batch_size`` above 1)."""

    model: Any
    tokenizer: Any
    request: EditRequest
    method: str
    layer: int
    layers: list[int]
    hparams: Any
    covariance: Any = None
    templates: list[str] | None = None
    #: Requests edited together with ``request`` in one update (mass editing: MEMIT, EMMET);
    #: ``request`` stays the one the caller measures.
    co_requests: tuple[EditRequest, ...] = ()
    #: This edit's optimisation, already run together with other edits' (issue 28; the
    #: method's ``batched_fit``): its v*/z* in the order of the method's ``vstar_jobs`` (a
    #: ``VStar`` each), or finetuning's one ``FinetuneOutcome``; an ``EditFailed`` where the
    #: optimisation failed. Empty: the method optimises its own (the sequential reference).
    vstars: tuple[Any, ...] = ()


@dataclass(frozen=True)
class GroupedEdit:
    """One edit of a group optimised together (issue 28): what :func:`locedit.editing.edited`
    would be called with."""

    method: str
    request: EditRequest
    layer: int
    hparams: Any = None
    co_requests: tuple[EditRequest, ...] = ()


@dataclass
class EditResult:
    """What one edit did; filled in by the editor, finished by :func:`edited`.

    ``diagnostics`` holds numbers worth logging per edit (ROME's division factor, the relative
    update norm ||dW||_F / ||W||_F per edited matrix, the optimisation's first and last loss);
    ``flags`` names suspicious edits (``extreme_division_factor``, ``large_update``, and
    ``no_change`` when no weight moved, e.g. finetuning that had converged before its first step);
    ``tensors`` keeps the vectors of the closed-form updates (k*, v*, u) for inspection and tests.
    """

    method: str
    layer: int
    layers: list[int]
    seconds: float = 0.0
    changed: list[str] = field(default_factory=list)
    diagnostics: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_record(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors; non-finite numbers become ``None``)."""
        return {
            "method": self.method,
            "layer": self.layer,
            "layers": list(self.layers),
            "seconds": self.seconds,
            "changed": list(self.changed),
            "diagnostics": {
                k: (float(v) if math.isfinite(float(v)) else None)
                for k, v in self.diagnostics.items()
            },
            "flags": list(self.flags),
        }
