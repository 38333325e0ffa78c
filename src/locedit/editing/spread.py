"""MEMIT's layer spread (Meng et al. 2022b, Sec. 4.3, Alg. 1), with the per-layer solve a
parameter: MEMIT, EMMET and AlphaEdit share everything here and differ only in the solve.

z* is the residual stream after the window's last layer that makes the target likely (the
same optimisation as ROME's v*, :mod:`locedit.editing.vstar`). Then, for each layer i of the
window in ascending order, with the layers below already updated:
    r_i = (z* - z_current) / (number of window layers from i on)
and the layer's solve turns its key k_i (averaged as MEMIT's ``compute_ks`` does:
:func:`~locedit.editing.batch.memit_key_mean`) and wanted output change r_i into an update
dW_i in the out x in orientation, which is added to the down-projection.

Architectures whose MLP output passes an RMSNorm before joining the residual stream (Gemma
2/3, ``ArchSpec.mlp_post_norm``) break MEMIT's additive assumption; there r_i is first turned
into the MLP-output change that moves the normed output by r_i, to first order and as far as
the norm allows (:func:`mlp_change_for`). Families that scale the MLP output before adding it
(Granite's ``residual_multiplier``) ask the MLP for r_i / gain, the gain measured once per model
(:func:`locedit.models.residual.residual_gain`; exactly 1 elsewhere, so nothing changes there).

A solve sees the keys as a matrix K [d_mlp, B] and the wanted changes as R [d_out, B], one
column per request of the update: the edited fact alone (B = 1, the paper's setting) or with
``batch_size - 1`` co-edited facts (``EditCall.co_requests``), as MEMIT's Alg. 1 edits a batch:
each request's z* optimised on its own, each layer's columns measured with the layers below
already updated, one solve per layer for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from locedit.editing.batch import EditBatch, memit_key_mean, request_batch
from locedit.editing.covariance import down_proj_module
from locedit.editing.forward import captured_io, run_batch_until
from locedit.editing.hparams import SpreadHParams
from locedit.editing.types import EditCall, EditFailed, EditRequest, EditResult
from locedit.editing.vstar import VStarJob, given_vstar, optimise_vstar
from locedit.models.architecture import (
    arch_spec,
    component_module,
    down_proj_weight,
    from_out_in,
    get_module,
)
from locedit.models.hooks import recorded
from locedit.models.residual import residual_gain


@dataclass(frozen=True)
class LayerProblem:
    """What one layer of the spread asks of its solve: the update dW with dW K ~ R."""

    model: nn.Module
    method: str
    layer: int
    #: K [d_mlp, B], float64: one key per edited fact
    keys: torch.Tensor
    #: R [d_out, B], float64: the output change wanted at each key
    residuals: torch.Tensor
    hparams: Any
    #: the CovarianceStore (key statistics)
    covariance: Any


@dataclass
class LayerUpdate:
    """A solve's answer: dW [d_out, d_mlp] (float64, out x in) and numbers worth logging (per-layer
    names end in ``_l{layer}``)."""

    delta_out_in: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)


#: A layer's solve: given K, R, the key statistics and the hyperparameters, the update.
LayerSolve = Callable[[LayerProblem], LayerUpdate]


def realised_share(residuals: torch.Tensor, delta: torch.Tensor, keys: torch.Tensor) -> float:
    """trace(R^T dW K) / ||R||^2: how much of the wanted changes R [d_out, B] the update
    dW [d_out, d_mlp] realises at the edited keys K [d_mlp, B] (1 for an exact solve)."""
    wanted = float(residuals.square().sum())
    return float(torch.sum(residuals * (delta @ keys))) / wanted if wanted > 0 else 1.0


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
        moved = float((normed(current) - start) @ wanted)
    # Nothing wanted (z* equal to the current output, as half precision can round it): all of
    # nothing is realised, as in ``realised_share``. ``scale**2`` underflows long before 0.
    realised = moved / scale**2 if scale**2 > 0 else 1.0
    return change, realised


@dataclass
class _Edited:
    """One request of the update: its prompts, its z* and where z started."""

    batch: EditBatch
    z_target: torch.Tensor
    z_initial: torch.Tensor | None = None


@dataclass(frozen=True)
class _Column:
    """One request's column of a layer's solve, and what the spread logs about it."""

    key: torch.Tensor
    residual: torch.Tensor
    #: z at the lookup token before this layer's update (the share's starting point)
    z_now: torch.Tensor
    #: the share r_i before the gain and post-norm conversions
    share: torch.Tensor
    #: the post-MLP norm's realised share (None without a post-MLP norm)
    post_norm_realised: float | None


def _z_job(edit: EditCall, request: EditRequest) -> VStarJob:
    """z* of one request (MEMIT's ``compute_z``, run per request as Alg. 1 does): the residual
    stream after the window's last layer, every layer up to it unchanged."""
    z_layer = max(edit.layers)
    batch = request_batch(edit.model, edit.tokenizer, request, edit.templates, edit.hparams)
    module = component_module(edit.model, "resid", z_layer)
    return VStarJob(batch, module, z_layer + 1, edit.hparams, request.direction, edit.method)


def spread_vstar_jobs(edit: EditCall) -> list[VStarJob]:
    """The z* optimisations :func:`spread_update` runs (the edited request's, then each
    co-edited one's), for a batched run."""
    return [_z_job(edit, request) for request in (edit.request, *edit.co_requests)]


def _optimise_z(edit: EditCall, index: int, request: EditRequest):
    job = _z_job(edit, request)
    zstar = given_vstar(edit, index) or optimise_vstar(
        edit.model, job.batch, job.module, job.n_frozen, job.hparams, job.direction, job.method
    )
    return job.batch, zstar


def _layer_column(
    edit: EditCall,
    entry: _Edited,
    layer: int,
    remaining: int,
    z_module: nn.Module,
    gain: float,
) -> _Column:
    """A request's key k_i (MEMIT's ``compute_ks`` mean) and wanted MLP-output change at
    ``layer``: its share (z* - z_now) / ``remaining`` of the way to z*, over the residual gain
    and through the post-MLP norm where the architecture has one (Meng et al. 2022b, Alg. 1)."""
    model, batch = edit.model, entry.batch
    with (
        captured_io(down_proj_module(model, layer), batch.lookup) as found,
        recorded({"z": z_module}) as rec,
    ):
        run_batch_until(model, batch, z_module)
    key = memit_key_mean(found["input"].double(), batch)
    mlp_out = found["output"].double()[batch.bare].mean(0)
    z_now = _lookup_mean(rec["z"], batch).double()
    if entry.z_initial is None:
        entry.z_initial = z_now
    share = (entry.z_target - z_now) / remaining
    residual = share
    if gain != 1.0:  # the stream adds gain x the MLP's contribution
        residual = residual / gain
    realised = None
    post_norm = arch_spec(model).mlp_post_norm
    if post_norm is not None:
        norm = get_module(model, post_norm.format(layer))
        residual, realised = mlp_change_for(
            norm, mlp_out, residual, iterations=edit.hparams.post_norm_iterations
        )
    return _Column(key, residual, z_now, share, realised)


def _z_final(model: nn.Module, entry: _Edited, z_module: nn.Module) -> torch.Tensor:
    with recorded({"z": z_module}) as rec:
        run_batch_until(model, entry.batch, z_module)
    return _lookup_mean(rec["z"], entry.batch).double()


def _z_realised(previous: tuple[int, torch.Tensor, torch.Tensor], z_after: torch.Tensor) -> dict:
    """``z_realised_l{layer}``: the part of the layer's share r that z moved by,
    (z_after - z_before) . r / ||r||^2, for ``previous`` = (layer, z_before, r)."""
    layer, z_before, share = previous
    wanted = float(share.square().sum())
    moved = float((z_after - z_before) @ share) / wanted if wanted > 0 else 1.0
    return {f"z_realised_l{layer}": moved}


def _residual_fraction(z_target, z_initial, z_final) -> float:
    """||z* - z_final|| / ||z* - z_initial||: how much of the wanted change of z is missing."""
    wanted = float((z_target - z_initial).norm())
    return float((z_target - z_final).norm()) / wanted if wanted > 0 else math.nan


def spread_update(edit: EditCall, solve: LayerSolve) -> EditResult:
    """Edit ``edit.model`` in place over ``edit.layers`` (the window around ``edit.layer``),
    each layer's update from ``solve``; the caller (:func:`locedit.editing.edited`) restores.

    ``edit.request`` and ``edit.co_requests`` are edited in one update (MEMIT's Alg. 1, Meng
    et al. 2022b; EMMET's batch, Gupta et al. 2024): a z* per request, then per layer one column of K and R per request and one solve.
    The diagnostics and tensors describe ``edit.request``; ``batch_size`` counts the update's
    requests and ``co_z_residual_fraction`` averages the co-edited requests' missing share.
    """
    model, method, layers = edit.model, edit.method, edit.layers
    z_layer = max(layers)
    z_module = component_module(model, "resid", z_layer)

    entries: list[_Edited] = []
    diagnostics: dict[str, float] = {"z_layer": float(z_layer)}
    flags: list[str] = []
    for index, request in enumerate((edit.request, *edit.co_requests)):
        batch, zstar = _optimise_z(edit, index, request)
        if not entries:  # the focal request's optimisation is the one logged
            diagnostics.update(zstar.diagnostics("z"))
            flags.extend(zstar.flags("z"))
        entries.append(_Edited(batch, zstar.target.double()))
    hp: SpreadHParams = edit.hparams
    diagnostics["batch_size"] = float(len(entries))
    focal = entries[0]
    tensors: dict[str, torch.Tensor] = {"z_star": focal.z_target.float()}
    previous: tuple[int, torch.Tensor, torch.Tensor] | None = None
    gain = residual_gain(model)  # 1.0 unless the family scales the MLP output (Granite)
    for position, edit_layer in enumerate(layers):
        columns = [
            _layer_column(edit, entry, edit_layer, len(layers) - position, z_module, gain)
            for entry in entries
        ]
        mine = columns[0]
        if previous is not None:  # how much of the last layer's share z really moved by
            diagnostics.update(_z_realised(previous, mine.z_now))
        previous = (edit_layer, mine.z_now, mine.share)
        if mine.post_norm_realised is not None:
            diagnostics[f"post_norm_realised_l{edit_layer}"] = mine.post_norm_realised

        update = solve(
            LayerProblem(
                model,
                method,
                edit_layer,
                torch.stack([c.key for c in columns], 1),
                torch.stack([c.residual for c in columns], 1),
                hp,
                edit.covariance,
            )
        )
        delta_out_in = update.delta_out_in
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
        diagnostics.update(update.diagnostics)
        tensors[f"k_l{edit_layer}"] = mine.key.float()
        tensors[f"r_l{edit_layer}"] = mine.residual.float()
        if ratio > hp.flag_update_ratio and "large_update" not in flags:
            flags.append("large_update")

    # How much of the requested change of z the finished edit realises.
    z_final = _z_final(model, focal, z_module)
    if previous is not None:
        diagnostics.update(_z_realised(previous, z_final))
    diagnostics["z_residual_fraction"] = _residual_fraction(
        focal.z_target, focal.z_initial, z_final
    )
    if len(entries) > 1:
        diagnostics["co_z_residual_fraction"] = sum(
            _residual_fraction(e.z_target, e.z_initial, _z_final(model, e, z_module))
            for e in entries[1:]
        ) / (len(entries) - 1)
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
