"""ROME (Meng et al. 2022a): a rank-one update of one MLP down-projection.

W' = W + (v* - W k - b) u^T / (k . u), with u = C^-1 k_avg / ||C^-1 k_avg||. k_avg is the key
at the subject's last token averaged over context-template prefixes, v* the MLP output that
makes the target likely (:mod:`locedit.editing.vstar`). Which key the division uses is
``key_policy`` (DESIGN.md §8): ``original`` divides by the prompt-only key as ROME does, so
(W' k_prompt + b) = v*, and explodes when k_prompt . u is near zero (first-token subjects);
``consistent`` (r-ROME) uses k_avg in both places, so (W' k_avg + b) = v*.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from locedit.editing.batch import EditBatch, request_batch, template_mean
from locedit.editing.covariance import SingularCovarianceError, down_proj_module
from locedit.editing.forward import captured_io, run_batch_until
from locedit.editing.hparams import RomeHParams
from locedit.editing.types import EditCall, EditFailed, EditResult
from locedit.editing.vstar import VStarJob, given_vstar, optimise_vstar
from locedit.models.architecture import component_module, down_proj_weight, from_out_in


def mlp_keys(model: nn.Module, batch: EditBatch, layer: int) -> dict[str, torch.Tensor]:
    """Down-projection input (key) and output at each row's lookup token, [B, d]."""
    module = down_proj_module(model, layer)
    with captured_io(module, batch.lookup) as found:
        run_batch_until(model, batch, module)
    return found


def _vstar_args(edit: EditCall, batch: EditBatch) -> tuple:
    """ROME's v*: the MLP output of the edit layer, the layers below it unchanged."""
    module = component_module(edit.model, "mlp", edit.layer)
    return edit.model, batch, module, edit.layer, edit.hparams, edit.request.direction, edit.method


def rome_vstar_jobs(edit: EditCall) -> list[VStarJob]:
    """The one v* optimisation :func:`apply_rome` runs, for a batched run."""
    batch = request_batch(edit.model, edit.tokenizer, edit.request, edit.templates, edit.hparams)
    return [VStarJob(*_vstar_args(edit, batch)[1:])]


def apply_rome(edit: EditCall) -> EditResult:
    """Edit ``edit.model`` in place at ``edit.layer`` (its one layer); the caller
    (:func:`locedit.editing.edited`) restores it."""
    model, request, method, layer = edit.model, edit.request, edit.method, edit.layer
    hp: RomeHParams = edit.hparams
    covariance = edit.covariance
    batch = request_batch(model, edit.tokenizer, request, edit.templates, hp)

    # Keys and values at the lookup token of every row, from one forward of the unedited model.
    found = mlp_keys(model, batch, layer)
    keys, values = found["input"].double(), found["output"].double()
    k_avg, k_prompt = template_mean(keys, batch), keys[batch.bare].mean(0)
    out_avg, out_prompt = template_mean(values, batch), values[batch.bare].mean(0)

    solver = None
    if hp.mom2_adjustment:
        try:
            solver = covariance.solver(model, layer, hp.covariance_ridge)
            u = solver.solve(k_avg)
        except SingularCovarianceError as err:
            raise EditFailed(method, str(err)) from err
    else:  # the original's mom2_adjustment: false
        u = k_avg.clone()
    u = u / u.norm()

    vstar = given_vstar(edit, 0) or optimise_vstar(*_vstar_args(edit, batch))
    v_star = vstar.target.double()
    if hp.key_policy == "original":
        k_star, current = k_prompt, out_prompt
    elif hp.key_policy == "consistent":
        k_star, current = k_avg, out_avg
    else:
        raise ValueError(f"unknown key_policy {hp.key_policy!r}; use original or consistent")
    division = float(k_star @ u)
    right = (v_star - current) / division
    delta_out_in = torch.outer(right, u)
    if not bool(torch.isfinite(delta_out_in).all()):
        raise EditFailed(method, f"non-finite update (division factor k.u = {division:.3e})")

    weight = down_proj_weight(model, layer)
    with torch.no_grad():
        update = from_out_in(model, delta_out_in).to(weight.dtype)
        weight_norm = float(weight.double().norm())
        weight.add_(update)
    if not bool(torch.isfinite(weight).all()):
        raise EditFailed(method, "edited weights are not finite")

    reference = float(k_avg @ u)
    ratio = division / reference if reference else float("inf")
    update_ratio = float(delta_out_in.norm()) / weight_norm
    diagnostics = {
        "division_factor": division,
        "division_factor_avg_key": reference,
        "division_ratio": ratio,
        "update_norm_ratio": update_ratio,
        "covariance_ridge": solver.ridge if solver is not None else math.nan,
        "covariance_condition": solver.condition if solver is not None else math.nan,
        "n_rows": float(batch.size),
        **vstar.diagnostics("v"),
    }
    flags = vstar.flags("v")
    low = hp.flag_division_ratio
    if not (low <= ratio <= 1.0 / low):
        flags.append("extreme_division_factor")
    if update_ratio > hp.flag_update_ratio:
        flags.append("large_update")
    return EditResult(
        method=method,
        layer=layer,
        layers=[layer],
        diagnostics=diagnostics,
        flags=flags,
        hparams=hp.to_dict(),
        tensors={
            "k_star": k_star.float(),
            "v_star": v_star.float(),
            "u": u.float(),
            "k_avg": k_avg.float(),
            "k_prompt": k_prompt.float(),
            "right": right.float(),
        },
    )
