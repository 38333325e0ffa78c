"""MEMIT (Meng et al. 2022b) for a single request, spread over a window of layers.

The z* optimisation, the per-layer keys and residual shares and the post-MLP-norm handling
are MEMIT's layer spread (:mod:`locedit.editing.spread`). MEMIT's own part is the solve of
each layer (its least-squares update with the covariance weighted by lambda, for one key):
    dW_i = r_i k_i^T (lambda C_i + k_i k_i^T)^-1
with lambda the covariance weight. It uses a cached Cholesky factor of C_i and the
Sherman-Morrison identity, in float64, and checks the residual of the full system.
"""

from __future__ import annotations

import torch

from locedit.editing.covariance import SingularCovarianceError
from locedit.editing.hparams import EmmetHParams, MemitHParams
from locedit.editing.spread import LayerProblem, LayerUpdate, mlp_change_for, spread_update
from locedit.editing.types import EditCall, EditFailed, EditResult

__all__ = ["apply_memit", "effective_mom2_weight", "memit_solve", "mlp_change_for"]


def effective_mom2_weight(hp: MemitHParams | EmmetHParams, d_mlp: int) -> float:
    """lambda scaled from the reference width (GPT-J's d_mlp) to this model's."""
    if hp.mom2_weight_reference_d_mlp is None:
        return hp.mom2_weight
    return hp.mom2_weight * d_mlp / hp.mom2_weight_reference_d_mlp


def memit_solve(problem: LayerProblem) -> LayerUpdate:
    """MEMIT's update of one layer for one key: r (lambda C + k k^T)^-1 k, out x in."""
    if problem.keys.shape[1] != 1:
        raise ValueError("memit_solve takes one key (locedit edits one fact per edit)")
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


def apply_memit(edit: EditCall) -> EditResult:
    """Edit ``edit.model`` in place over ``edit.layers`` (the window around ``edit.layer``)."""
    return spread_update(edit, memit_solve)
