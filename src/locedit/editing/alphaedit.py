"""AlphaEdit (Fang et al., ICLR 2025, arXiv 2410.02355): MEMIT's update projected onto the
null space of the preserved keys.

The preserved keys K_0 enter only through their second moment C = E[k k^T] (the statistic
ROME and MEMIT use). Its eigenvectors U_0 with eigenvalues below ``nullspace_threshold`` span
(numerically) the null space of K_0 K_0^T, and P = U_0 U_0^T projects onto it (Sec. 3). An
update of the form dW = dW' P leaves every preserved key's output unchanged, dW k_0 ~ 0, so the
objective drops MEMIT's preservation term and keeps a ridge:
    dW'^T = (P (K K^T + K_p K_p^T) + L2 I)^-1 P K R^T,    dW = dW' P,
with K the edited keys, R their wanted output changes and K_p the keys of earlier edits in a
sequence (empty here: every edit starts from the unedited model). Because (I - P) applied to
the system leaves L2 (I - P) dW'^T = 0, the solution already lies in the null space: dW = dW'.
The reference code (github.com/jianghoucheng/AlphaEdit, ``AlphaEdit/AlphaEdit_main.py`` and
``get_project`` in ``experiments/evaluate.py``) compares the singular values of the raw
second moment with the threshold (absolute; ``nullspace_relative`` makes it relative to the
mean eigenvalue) and uses L2 = 10 and threshold 2e-2 for GPT-J. Keys, z* and the layer spread
are MEMIT's (:mod:`locedit.editing.spread`).

The projector costs an eigendecomposition of a d_mlp x d_mlp matrix; it is cached per model,
corpus, layer and threshold (:func:`null_space_for`). The d_mlp x d_mlp system is solved
through the Woodbury identity (its low-rank part has rank B + |K_p|) with a residual check of
the full system.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from locedit.editing.hparams import AlphaEditHParams
from locedit.editing.spread import LayerProblem, LayerUpdate, realised_share, spread_update
from locedit.editing.types import EditCall, EditFailed, EditResult
from locedit.models.device import accumulation_device, model_device

#: Largest relative residual accepted from the projected solve.
TOLERANCE = 1e-8
#: Projectors kept per CovarianceStore (a window of 5 plus one), and their bytes at most.
MAX_CACHED = 6
MAX_CACHED_BYTES = 16 << 30


@dataclass(frozen=True)
class NullSpace:
    """P = U_0 U_0^T for the eigenvectors U_0 of C below the threshold."""

    #: P [d_mlp, d_mlp], float64
    projector: torch.Tensor
    #: number of null-space directions (columns of U_0)
    dim: int
    #: the absolute eigenvalue threshold used
    threshold: float

    @property
    def nbytes(self) -> int:
        return self.projector.element_size() * self.projector.nelement()


def null_space(moment: torch.Tensor, threshold: float, relative: bool = False) -> NullSpace:
    """The null-space projector of the second moment ``moment`` (float64, on its device).

    ``relative``: the threshold is ``threshold`` x trace(C)/d instead of ``threshold``. C is
    symmetric positive semi-definite, so its eigendecomposition equals the reference's SVD.
    """
    matrix = moment.double()
    matrix = 0.5 * (matrix + matrix.T)
    absolute = float(threshold) * (
        float(torch.trace(matrix)) / matrix.shape[0] if relative else 1.0
    )
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    null = eigenvectors[:, eigenvalues < absolute]
    return NullSpace(null @ null.T, int(null.shape[1]), absolute)


_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def null_space_for(
    covariance, model: nn.Module, layer: int, threshold: float, relative: bool = False
) -> NullSpace:
    """The layer's projector from a CovarianceStore, cached per (model, corpus, layer,
    threshold) like the store's Cholesky factors."""
    cache = _CACHES.setdefault(covariance, OrderedDict())
    key = (covariance.fingerprint(model), covariance.corpus, layer, float(threshold), relative)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    device = accumulation_device(model_device(model))
    space = null_space(covariance.get(model, layer).to(device), threshold, relative)
    cache[key] = space
    while len(cache) > 1 and (
        len(cache) > MAX_CACHED or sum(s.nbytes for s in cache.values()) > MAX_CACHED_BYTES
    ):
        cache.popitem(last=False)
    return space


def alphaedit_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: torch.Tensor,
    l2: float,
    previous_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """AlphaEdit's update dW [d_out, d_mlp] (float64, out x in) for keys K [d_mlp, B], wanted
    changes R [d_out, B], the projector P and earlier edits' keys K_p [d_mlp, B_p].

    With A = P K_all K_all^T + L2 I (K_all = [K, K_p]) Woodbury gives
    A^-1 = (I - P K_all (L2 I + K_all^T P K_all)^-1 K_all^T) / L2. Returns dW and the realised
    share trace(R^T dW K) / ||R||^2; raises ValueError when L2 <= 0 (the system is singular)
    or the residual check of the full system fails.
    """
    if not l2 > 0:
        raise ValueError("AlphaEdit needs L2 > 0: P (K K^T) alone is singular")
    keys = keys.double()
    device = keys.device
    residuals, projector = residuals.double().to(device), projector.double().to(device)
    if keys.ndim != 2 or residuals.ndim != 2 or keys.shape[1] != residuals.shape[1]:
        raise ValueError("keys must be [d_mlp, B] and residuals [d_out, B] with the same B")
    every = (
        keys if previous_keys is None else torch.cat([keys, previous_keys.double().to(device)], 1)
    )
    projected = projector @ every  # P K_all [d, m]
    small = l2 * torch.eye(every.shape[1], dtype=torch.float64, device=device) + every.T @ projected
    rhs = (projector @ keys) @ residuals.T  # P K R^T [d, d_out]
    inner = torch.linalg.solve(small, every.T @ rhs)
    solution = (rhs - projected @ inner) / l2  # dW^T [d, d_out]
    applied = projected @ (every.T @ solution) + l2 * solution
    check = float((applied - rhs).norm() / rhs.norm().clamp_min(1e-300))
    if not check <= TOLERANCE:
        raise ValueError(f"AlphaEdit's projected solve residual {check:.2e}")
    delta = solution.T
    share = realised_share(residuals, delta, keys)
    return delta, {"realised_share": share}


def alphaedit_solve(problem: LayerProblem) -> LayerUpdate:
    """One layer of the spread: :func:`alphaedit_delta` with this layer's null space."""
    hp: AlphaEditHParams = problem.hparams
    method, layer = problem.method, problem.layer
    space = null_space_for(
        problem.covariance, problem.model, layer, hp.nullspace_threshold, hp.nullspace_relative
    )
    if space.dim == 0:
        raise EditFailed(
            method,
            f"layer {layer}: no eigenvalue of the key second moment is below "
            f"{space.threshold:.3g} (nullspace_threshold): the null space is empty",
        )
    try:
        delta, numbers = alphaedit_delta(problem.keys, problem.residuals, space.projector, hp.L2)
    except ValueError as err:
        raise EditFailed(method, f"layer {layer}: {err}") from err
    return LayerUpdate(
        delta,
        {
            f"realised_share_l{layer}": numbers["realised_share"],
            f"nullspace_dim_l{layer}": float(space.dim),
        },
    )


def apply_alphaedit(edit: EditCall) -> EditResult:
    """Edit ``edit.model`` in place over ``edit.layers`` (the window around ``edit.layer``)."""
    return spread_update(edit, alphaedit_solve)
