"""EMMET (Gupta, Sajnani & Anumanchipalli, Findings of EMNLP 2024, arXiv 2403.14236).

ROME's equality-constrained objective for a batch of keys: keep the preserved keys' outputs
(second moment C) as close as possible while every edited key k_j gets exactly its wanted
change r_j,
    min ||dW K_0||^2  subject to  dW K = R,
whose closed form (the paper's EMMET update, its Lagrangian solution) is
    dW = R (K^T C_w^-1 K + lambda_emmet I)^-1 K^T C_w^-1,    C_w = w C,
with lambda_emmet = 0 the exact constraint. The reference code
(github.com/scalable-model-editing/unified-model-editing, ``emmet/emmet_main.py``) scales C
by ``mom2_update_weight`` w and adds lambda_emmet I to D = K^T C_w^-1 K for ill-conditioned
batches; w cancels out of dW when lambda_emmet = 0. Keys, z* and the layer spread are MEMIT's
(:mod:`locedit.editing.spread`).

One fact per edit (B = 1) gives dW = r (C^-1 k)^T / (k^T C^-1 k + w lambda_emmet): ROME's
update for MEMIT's key and share, or MEMIT's with covariance weight w lambda_emmet. The
reference adds lambda_emmet only for B > 1; locedit adds it for every B so that the setting
acts on single edits too (``emmet_lambda: 0`` is the reference's single-edit update).
"""

from __future__ import annotations

import functools

import torch

from locedit.editing.covariance import CovarianceSolver, SingularCovarianceError
from locedit.editing.hparams import EmmetHParams
from locedit.editing.memit import weighted_layer_update
from locedit.editing.spread import LayerProblem, LayerUpdate, realised_share, spread_update
from locedit.editing.types import EditCall, EditResult

#: Largest relative residual accepted from the B x B solve.
TOLERANCE = 1e-8
#: Smallest eigenvalue of D accepted, relative to its largest. Two keys equal up to float32
#: rounding (the same subject at the start of two prompts) give ~1e-14 and an update 1e5 times
#: the weights; two distinct facts of the tiny test model give 0.3-0.5. A single key
#: (ratio 1) never meets it.
CONDITION_LIMIT = 1e-10


def emmet_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    solver: CovarianceSolver,
    mom2_weight: float,
    emmet_lambda: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """EMMET's update dW [d_out, d_mlp] (float64, out x in) for keys K [d_mlp, B] and wanted
    changes R [d_out, B], with ``solver`` holding the key second moment C.

    Returns dW and the realised share trace(R^T dW K) / ||R||^2 (1 when lambda_emmet = 0).
    Raises :class:`SingularCovarianceError` when D = K^T C_w^-1 K + lambda I is not positive
    definite or nearly singular (keys (nearly) linearly dependent with lambda_emmet = 0, below
    :data:`CONDITION_LIMIT`) or a solve misses its residual check.
    """
    keys, residuals = keys.double(), residuals.double().to(keys.device)
    if keys.ndim != 2 or residuals.ndim != 2 or keys.shape[1] != residuals.shape[1]:
        raise ValueError("keys must be [d_mlp, B] and residuals [d_out, B] with the same B")
    if not mom2_weight > 0 or emmet_lambda < 0:
        raise ValueError("EMMET needs mom2_weight > 0 and emmet_lambda >= 0")
    batch = int(keys.shape[1])
    whitened = solver.solve(keys) / mom2_weight  # C_w^-1 K [d_mlp, B]
    d = keys.T @ whitened
    d = 0.5 * (d + d.T) + emmet_lambda * torch.eye(batch, dtype=d.dtype, device=d.device)
    factor, info = torch.linalg.cholesky_ex(d)
    if int(info) != 0:
        raise SingularCovarianceError(
            "K^T C^-1 K + lambda_emmet I is not positive definite (dependent keys?)"
        )
    right = torch.cholesky_solve(whitened.T, factor)  # D^-1 K^T C_w^-1 [B, d_mlp]
    check = float((d @ right - whitened.T).norm() / whitened.norm().clamp_min(1e-300))
    if not check <= TOLERANCE:
        raise SingularCovarianceError(f"EMMET's B x B solve residual {check:.2e}")
    eigenvalues = torch.linalg.eigvalsh(d)
    if not float(eigenvalues[0]) > CONDITION_LIMIT * float(eigenvalues[-1]):
        raise SingularCovarianceError(
            "K^T C^-1 K + lambda_emmet I is nearly singular (eigenvalue ratio "
            f"{float(eigenvalues[0] / eigenvalues[-1]):.1e}): edited keys (nearly) coincide, "
            "which needs emmet_lambda > 0"
        )
    delta = residuals @ right
    share = realised_share(residuals, delta, keys)
    return delta, {"realised_share": share, "d_min_eigenvalue": float(eigenvalues[0])}


def emmet_solve(problem: LayerProblem) -> LayerUpdate:
    """One layer of the spread: :func:`emmet_delta` with this layer's key statistics."""
    hp: EmmetHParams = problem.hparams
    return weighted_layer_update(
        problem,
        functools.partial(emmet_delta, emmet_lambda=hp.emmet_lambda),
        {"d_min_eigenvalue": "emmet_d"},
    )


def apply_emmet(edit: EditCall) -> EditResult:
    """Edit ``edit.model`` in place over ``edit.layers`` (the window around ``edit.layer``)."""
    return spread_update(edit, emmet_solve)
