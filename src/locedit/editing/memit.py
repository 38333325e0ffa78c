"""MEMIT (Meng et al. 2022b) for a single request, spread over a window of layers.

z* is the residual stream after the window's last layer that makes the target likely (the
same optimisation as ROME's v*, :mod:`locedit.editing.vstar`). Then, for each layer i of the
window in ascending order, with the layers below already updated:
    r_i = (z* - z_current) / (number of window layers from i on)
    dW_i = r_i k_i^T (lambda C_i + k_i k_i^T)^-1
where k_i is the key at layer i averaged as MEMIT's ``compute_ks`` does (the bare prompt
weighs 1/2, the context templates share the other half: :func:`memit_key_mean`) and lambda
the covariance weight. The solve uses a cached Cholesky factor of C_i and the Sherman-Morrison
identity, in float64, and checks the residual of the full system.

Architectures whose MLP output passes an RMSNorm before joining the residual stream (Gemma
2/3, ``ArchSpec.mlp_post_norm``) break MEMIT's additive assumption; there the residual share
r_i is first turned into the MLP-output change that moves the normed output by r_i, to first
order and as far as the norm allows (:func:`mlp_change_for`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from locedit.editing.batch import memit_key_mean, request_batch
from locedit.editing.covariance import SingularCovarianceError, down_proj_module
from locedit.editing.forward import captured_io, run_batch_until
from locedit.editing.hparams import MemitHParams
from locedit.editing.types import EditCall, EditFailed, EditResult
from locedit.editing.vstar import optimise_vstar
from locedit.models.architecture import (
    arch_spec,
    component_module,
    down_proj_weight,
    from_out_in,
    get_module,
)
from locedit.models.hooks import recorded


def effective_mom2_weight(hp: MemitHParams, d_mlp: int) -> float:
    """lambda scaled from the reference width (GPT-J's d_mlp) to this model's."""
    if hp.mom2_weight_reference_d_mlp is None:
        return hp.mom2_weight
    return hp.mom2_weight * d_mlp / hp.mom2_weight_reference_d_mlp


def mlp_change_for(
    norm: nn.Module,
    mlp_out: torch.Tensor,
    wanted: torch.Tensor,
    damping: float = 1e-3,
    iterations: int = 1,
    tolerance: float = 1e-3,
) -> tuple[torch.Tensor, float]:
    """The MLP-output change that moves ``norm(mlp_out)`` by ``wanted`` (post-MLP norms).

    MEMIT assumes the MLP output joins the residual stream as it is. Gemma 2/3 first pass it
    through an RMSNorm, whose output has a fixed size and whose gain nearly vanishes in some
    directions. Each Gauss-Newton step is the damped least-squares solution of J dm = what is
    still missing, with J the norm's Jacobian at the current point
    (dm = (J^T J + mu I)^-1 J^T missing, mu = ``damping`` x the mean eigenvalue of J^T J), so
    unreachable directions are not chased; MEMIT's later layers correct what is left. One step
    is the first-order answer, which falls short when the wanted change is a sizeable part of
    the norm's output (Gemma's residual updates are); up to ``iterations`` steps run until the
    missing part is below ``tolerance`` x ||wanted||. Returns the change and the realised share
    (norm(mlp_out + change) - norm(mlp_out)) . wanted / ||wanted||^2, measured, not linearised.
    """
    point, wanted = mlp_out.detach().double(), wanted.detach().double()
    d = int(point.shape[0])

    def normed(x: torch.Tensor) -> torch.Tensor:
        return norm(x[None].float())[0].double()

    with torch.no_grad():
        start = normed(point)
    goal = start + wanted
    current = point.clone()
    scale = float(wanted.norm().clamp_min(1e-300))
    for _ in range(max(1, iterations)):
        with torch.no_grad():
            missing = goal - normed(current)
        if float(missing.norm()) <= tolerance * scale:
            break
        jacobian = torch.autograd.functional.jacobian(normed, current, vectorize=True).detach()
        normal = jacobian.T @ jacobian
        mu = damping * float(torch.trace(normal)) / d
        step = torch.linalg.solve(
            normal + mu * torch.eye(d, dtype=torch.float64, device=point.device),
            jacobian.T @ missing,
        )
        current = current + step
    change = current - point
    with torch.no_grad():
        realised = float((normed(current) - start) @ wanted) / scale**2
    return change, realised


def apply_memit(edit: EditCall) -> EditResult:
    """Edit ``edit.model`` in place over ``edit.layers`` (the window around ``edit.layer``)."""
    model, request, method, layers = edit.model, edit.request, edit.method, edit.layers
    hp: MemitHParams = edit.hparams
    covariance = edit.covariance
    batch = request_batch(model, edit.tokenizer, request, edit.templates, hp)
    z_layer = max(layers)
    z_module = component_module(model, "resid", z_layer)

    zstar = optimise_vstar(model, batch, z_module, z_layer + 1, hp, request.direction, method)
    z_target = zstar.target.double()

    diagnostics: dict[str, float] = {"z_layer": float(z_layer), **zstar.diagnostics("z")}
    flags: list[str] = zstar.flags("z")
    tensors: dict[str, torch.Tensor] = {"z_star": z_target.float()}
    z_initial = None
    previous: tuple[int, torch.Tensor, torch.Tensor] | None = None
    post_norm = arch_spec(model).mlp_post_norm
    for position, edit_layer in enumerate(layers):
        keys_module = down_proj_module(model, edit_layer)
        with (
            captured_io(keys_module, batch.lookup) as found,
            recorded({"z": z_module}) as rec,
        ):
            run_batch_until(model, batch, z_module)
        k = memit_key_mean(found["input"].double(), batch)
        mlp_out = found["output"].double()[batch.bare].mean(0)
        z_now = _lookup_mean(rec["z"], batch).double()
        if z_initial is None:
            z_initial = z_now
        if previous is not None:  # how much of the last layer's share z really moved by
            last_layer, last_z, last_request = previous
            diagnostics[f"z_realised_l{last_layer}"] = float(
                (z_now - last_z) @ last_request / last_request.norm().clamp_min(1e-300) ** 2
            )
        residual = (z_target - z_now) / (len(layers) - position)
        previous = (edit_layer, z_now, residual)
        if post_norm is not None:
            norm = get_module(model, post_norm.format(edit_layer))
            residual, realised = mlp_change_for(
                norm, mlp_out, residual, iterations=hp.post_norm_iterations
            )
            diagnostics[f"post_norm_realised_l{edit_layer}"] = realised

        d_mlp = int(k.shape[0])
        weight_lambda = effective_mom2_weight(hp, d_mlp)
        try:
            solver = covariance.solver(model, edit_layer, hp.covariance_ridge)
            x = solver.solve(k) / weight_lambda
        except SingularCovarianceError as err:
            raise EditFailed(method, f"layer {edit_layer}: {err}") from err
        adjusted = x / (1.0 + float(k @ x))
        full = weight_lambda * (solver.matrix @ adjusted) + k * float(k @ adjusted)
        check = float((full - k).norm() / k.norm())
        if not check <= 1e-6:
            raise EditFailed(method, f"layer {edit_layer}: solve residual {check:.2e}")
        delta_out_in = torch.outer(residual, adjusted)
        if not bool(torch.isfinite(delta_out_in).all()):
            raise EditFailed(method, f"non-finite update at layer {edit_layer}")
        weight = down_proj_weight(model, edit_layer)
        with torch.no_grad():
            weight_norm = float(weight.double().norm())
            weight.add_(from_out_in(model, delta_out_in).to(weight.dtype))
        if not bool(torch.isfinite(weight).all()):
            raise EditFailed(method, f"edited weights at layer {edit_layer} are not finite")
        ratio = float(delta_out_in.norm()) / weight_norm
        diagnostics[f"update_norm_ratio_l{edit_layer}"] = ratio
        diagnostics[f"realised_share_l{edit_layer}"] = float(k @ adjusted)
        diagnostics[f"covariance_ridge_l{edit_layer}"] = solver.ridge
        diagnostics["mom2_weight"] = weight_lambda
        tensors[f"k_l{edit_layer}"] = k.float()
        if ratio > hp.flag_update_ratio and "large_update" not in flags:
            flags.append("large_update")

    # How much of the requested change of z the finished edit realises.
    with recorded({"z": z_module}) as rec:
        run_batch_until(model, batch, z_module)
    z_final = _lookup_mean(rec["z"], batch).double()
    if previous is not None:
        last_layer, last_z, last_request = previous
        diagnostics[f"z_realised_l{last_layer}"] = float(
            (z_final - last_z) @ last_request / last_request.norm().clamp_min(1e-300) ** 2
        )
    wanted = float((z_target - z_initial).norm())
    diagnostics["z_residual_fraction"] = (
        float((z_target - z_final).norm()) / wanted if wanted > 0 else math.nan
    )
    diagnostics["update_norm_ratio"] = max(
        v for key, v in diagnostics.items() if key.startswith("update_norm_ratio_l")
    )
    return EditResult(
        method=method,
        layer=edit.layer,
        layers=list(layers),
        diagnostics=diagnostics,
        flags=flags,
        hparams=hp.to_dict(),
        tensors=tensors,
    )


def _lookup_mean(output, batch) -> torch.Tensor:
    """Mean over the bare-prompt rows of a layer output at their lookup tokens."""
    value = output[0] if isinstance(output, tuple) else output
    rows = torch.nonzero(batch.bare)[:, 0]
    return value[rows, batch.lookup[rows]].mean(0)
