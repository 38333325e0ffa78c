"""MEMIT (Meng et al. 2022b) spread over a window of layers, for one request or a batch.

The z* optimisation, the per-layer keys and residual shares and the post-MLP-norm handling
are MEMIT's layer spread (:mod:`locedit.editing.spread`). MEMIT's own part is the solve of
each layer, its least-squares update with the covariance weighted by lambda (Sec. 4.3, Alg. 1):
    dW_i = R_i K_i^T (lambda C_i + K_i K_i^T)^-1
for keys K_i [d_mlp, B] and wanted changes R_i [d_out, B]. One key (B = 1, the paper's
single edits) uses the Sherman-Morrison identity, a batch its generalisation, the Woodbury
identity with a B x B Cholesky solve (:func:`memit_delta`); both in float64 from a cached
Cholesky factor of C_i, both with a residual check of the full system.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from locedit.editing.covariance import CovarianceSolver, SingularCovarianceError
from locedit.editing.hparams import EmmetHParams, MemitHParams
from locedit.editing.spread import (
    LayerProblem,
    LayerUpdate,
    mlp_change_for,
    realised_share,
    spread_update,
)
from locedit.editing.types import EditCall, EditFailed, EditResult

__all__ = [
    "apply_memit",
    "effective_mom2_weight",
    "memit_delta",
    "memit_solve",
    "mlp_change_for",
    "weighted_layer_update",
]


def effective_mom2_weight(hp: MemitHParams | EmmetHParams, d_mlp: int) -> float:
    """lambda scaled from the reference width (GPT-J's d_mlp) to this model's."""
    if hp.mom2_weight_reference_d_mlp is None:
        return hp.mom2_weight
    return hp.mom2_weight * d_mlp / hp.mom2_weight_reference_d_mlp


def memit_delta(
    keys: torch.Tensor, residuals: torch.Tensor, solver: CovarianceSolver, weight_lambda: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """MEMIT's batched update dW = R K^T (lambda C + K K^T)^-1 [d_out, d_mlp] (float64, out x
    in) for keys K [d_mlp, B] and wanted changes R [d_out, B] (Meng et al. 2022b, Alg. 1).

    Woodbury: (lambda C + K K^T)^-1 K = X (I + K^T X)^-1 with X = (lambda C)^-1 K, so only a
    B x B system is factored. Returns dW and the realised share trace(R^T dW K) / ||R||^2;
    raises :class:`SingularCovarianceError` when the solve misses its residual check.
    """
    keys, residuals = keys.double(), residuals.double().to(keys.device)
    if keys.ndim != 2 or residuals.ndim != 2 or keys.shape[1] != residuals.shape[1]:
        raise ValueError("keys must be [d_mlp, B] and residuals [d_out, B] with the same B")
    if not weight_lambda > 0:
        raise ValueError("MEMIT needs a covariance weight lambda > 0")
    x = solver.solve(keys) / weight_lambda  # (lambda C)^-1 K [d_mlp, B]
    small = keys.T @ x
    small = 0.5 * (small + small.T) + torch.eye(
        small.shape[0], dtype=small.dtype, device=small.device
    )
    factor, info = torch.linalg.cholesky_ex(small)
    if int(info) != 0:
        raise SingularCovarianceError("I + K^T (lambda C)^-1 K is not positive definite")
    adjusted = torch.cholesky_solve(x.T, factor).T  # (lambda C + K K^T)^-1 K [d_mlp, B]
    full = weight_lambda * (solver.matrix @ adjusted) + keys @ (keys.T @ adjusted)
    check = float((full - keys).norm() / keys.norm().clamp_min(1e-300))
    if not check <= 1e-6:
        raise SingularCovarianceError(f"MEMIT's batched solve residual {check:.2e}")
    delta = residuals @ adjusted.T
    share = realised_share(residuals, delta, keys)
    return delta, {"realised_share": share}


def memit_solve(problem: LayerProblem) -> LayerUpdate:
    """MEMIT's update of one layer: r (lambda C + k k^T)^-1 k for one key (Sherman-Morrison,
    the paper's single edits), :func:`memit_delta` for a batch."""
    if problem.keys.shape[1] != 1:
        return weighted_layer_update(problem, memit_delta)
    hp: MemitHParams = problem.hparams
    method, layer = problem.method, problem.layer
    k, residual = problem.keys[:, 0], problem.residuals[:, 0]
    d_mlp = int(k.shape[0])
    weight_lambda = effective_mom2_weight(hp, d_mlp)
    try:
        solver = problem.covariance.solver(problem.model, layer, hp.covariance_ridge)
        x = solver.solve(k) / weight_lambda
    except SingularCovarianceError as err:
        raise EditFailed(method, f"layer {layer}: {err}") from err
    adjusted = x / (1.0 + float(k @ x))
    full = weight_lambda * (solver.matrix @ adjusted) + k * float(k @ adjusted)
    check = float((full - k).norm() / k.norm())
    if not check <= 1e-6:
        raise EditFailed(method, f"layer {layer}: solve residual {check:.2e}")
    return LayerUpdate(
        torch.outer(residual, adjusted),
        {
            f"realised_share_l{layer}": float(k @ adjusted),
            f"covariance_ridge_l{layer}": solver.ridge,
            "mom2_weight": weight_lambda,
        },
    )


#: A batched solve on the layer's key statistics: (K, R, solver of C, lambda) -> (dW, numbers
#: with at least ``realised_share``); :func:`memit_delta`, EMMET's ``emmet_delta``.
WeightedDelta = Callable[
    [torch.Tensor, torch.Tensor, CovarianceSolver, float], tuple[torch.Tensor, dict[str, float]]
]


def weighted_layer_update(
    problem: LayerProblem, delta: WeightedDelta, named: Mapping[str, str] | None = None
) -> LayerUpdate:
    """One layer's update from ``delta`` with the layer's key statistics and MEMIT's covariance
    weight lambda scaled to the layer's width (MEMIT's batch, EMMET): a singular system fails
    the edit, and the realised share, the ridge and lambda are logged. ``named`` maps further
    numbers of ``delta`` to diagnostic names (suffixed with ``_l{layer}``)."""
    hp: MemitHParams | EmmetHParams = problem.hparams
    layer = problem.layer
    weight_lambda = effective_mom2_weight(hp, int(problem.keys.shape[0]))
    try:
        solver = problem.covariance.solver(problem.model, layer, hp.covariance_ridge)
        update, numbers = delta(problem.keys, problem.residuals, solver, weight_lambda)
    except SingularCovarianceError as err:
        raise EditFailed(problem.method, f"layer {layer}: {err}") from err
    diagnostics = {f"realised_share_l{layer}": numbers["realised_share"]}
    diagnostics.update({f"{name}_l{layer}": numbers[key] for key, name in (named or {}).items()})
    diagnostics.update({f"covariance_ridge_l{layer}": solver.ridge, "mom2_weight": weight_lambda})
    return LayerUpdate(update, diagnostics)


def apply_memit(edit: EditCall) -> EditResult:
    """Edit ``edit.model`` in place over ``edit.layers`` (the window around ``edit.layer``)."""
    return spread_update(edit, memit_solve)
