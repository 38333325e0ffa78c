"""Constrained finetuning (FT-1, FT-5): Adam on MLP weights inside an L-infinity ball.

What is optimised is a :class:`ConstrainedFinetune` LightningModule (loss in
``training_step``, Adam in ``configure_optimizers``, the projection back into the ball of
radius eps around the original weights after every optimiser step); how it runs is a
``lightning.Trainer`` on the model's device (``model.device``) with no logger, checkpoints or
progress bar, so nothing is left on disk. The paper's code trains the down-projection (weight
and bias) of each layer in the window; ``params: mlp`` trains every MLP parameter instead.

The user's model is *not* a registered submodule of the LightningModule: the Trainer moves its
module to the accelerator at setup and back with ``.cpu()`` in ``Strategy.teardown()`` after
every ``fit``, which would move the whole model to the CPU after each FT edit on a GPU (and
copy GPT-J's 12 GB). Holding it as a plain attribute is the least code that keeps Lightning as
the training loop: the Trainer still runs the steps, hooks and optimiser on the trained
parameters, which already live where the model does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from locedit.data.records import Direction
from locedit.editing.batch import EditBatch, build_batch
from locedit.editing.forward import hidden_states
from locedit.editing.hparams import FTHParams
from locedit.editing.loss import batch_target_log_probs, objective
from locedit.editing.types import EditCall, EditFailed, EditResult
from locedit.models.architecture import arch_spec, check_layer, mlp_param_names
from locedit.models.device import lightning_devices, model_device
from locedit.models.hooks import frozen_layers
from locedit.models.scoring import pad_token_id
from locedit.models.tokens import encode_target

log = logging.getLogger(__name__)


def d_mlp(model: nn.Module) -> int:
    """The key width: the input width of the down-projections (layer 0's)."""
    from locedit.models.architecture import as_out_in, down_proj_weight

    return int(as_out_in(model, down_proj_weight(model, 0)).shape[1])


def finetuned_param_names(
    model: nn.Module, layers: list[int], which: str = "down_proj"
) -> list[str]:
    """Parameters constrained finetuning trains at ``layers``."""
    if which == "mlp":
        return [name for layer in layers for name in mlp_param_names(model, layer)]
    if which != "down_proj":
        raise ValueError(f"unknown FT params {which!r}; use down_proj or mlp")
    names = dict(model.named_parameters())
    out = []
    for layer in layers:
        prefix = arch_spec(model).mlp_down.format(check_layer(model, layer))
        out.extend(n for n in (f"{prefix}.weight", f"{prefix}.bias") if n in names)
    return out


def effective_linf_eps(hp: FTHParams, d_mlp: int) -> float:
    """The L-infinity radius used: ``linf_eps``, scaled from the reference key width (GPT-J's
    d_mlp) to this model's when ``linf_reference_d_mlp`` is set."""
    if hp.linf_reference_d_mlp is None:
        return hp.linf_eps
    return hp.linf_eps * hp.linf_reference_d_mlp / d_mlp


def linf_bounds(original: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise [lo, hi] in the weight dtype with |bound - original| <= eps exactly.

    original +- eps rounded to float32 can land just outside the ball; such bounds are moved
    one representable value back towards the original.
    """
    exact = original.double()
    hi = (exact + eps).to(original.dtype)
    hi = torch.where(hi.double() - exact > eps, torch.nextafter(hi, original), hi)
    lo = (exact - eps).to(original.dtype)
    lo = torch.where(exact - lo.double() > eps, torch.nextafter(lo, original), lo)
    return lo, hi


class ConstrainedFinetune(pl.LightningModule):
    """Maximise (or minimise) log p(target | prompt) with weights kept near the originals."""

    def __init__(
        self,
        model: nn.Module,
        batch: EditBatch,
        param_names: list[str],
        hp: FTHParams,
        direction: Direction,
    ) -> None:
        super().__init__()
        # Not registered (see the module docstring): the Trainer's .to()/.cpu() never reach it.
        object.__setattr__(self, "model", model)
        self.batch = batch
        self.hp = hp
        self.direction = direction
        named = dict(model.named_parameters())
        self.param_names = list(param_names)
        self.trained = [named[name] for name in self.param_names]
        self.eps = effective_linf_eps(hp, d_mlp(model))
        self.bounds = [linf_bounds(p.detach(), self.eps) for p in self.trained]
        if not any(bool(((lo != p) | (hi != p)).any()) for p, (lo, hi) in zip(
            self.trained, self.bounds, strict=True
        )):
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self.trained})
            raise EditFailed("ft", f"linf_eps {self.eps:g} is below the {'/'.join(dtypes)} "
                             "resolution of every trained weight: no weight can change "
                             "(use model.dtype=float32 or a larger linf_eps)")
        # bfloat16/float16 weights train through float32 master copies (Adam's second moment
        # underflows in float16, and bfloat16 rounds most small steps away); the weights are
        # the masters rounded to their dtype, projected into the ball in both precisions.
        self.masters = [
            p.detach().float().clone().requires_grad_(True) if is_half(p) else None
            for p in self.trained
        ]
        self.master_bounds = [
            None if m is None else linf_bounds(m.detach(), self.eps) for m in self.masters
        ]
        self.losses: list[float] = []
        self.nlls: list[float] = []
        self.converged = False
        #: the farthest an optimiser step left the ball, in units of its radius
        self.max_overshoot = 0.0

    def configure_optimizers(self):
        params = [p if m is None else m for p, m in zip(self.trained, self.masters, strict=True)]
        return torch.optim.Adam(params, lr=self.hp.lr, weight_decay=self.hp.weight_decay)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(list(range(self.hp.steps)), batch_size=None)

    def on_train_start(self) -> None:
        self.model.eval()  # the Trainer switches to train mode; dropout must stay off

    def on_train_epoch_start(self) -> None:
        self.model.eval()

    def on_train_batch_start(self, _batch, _batch_idx):
        return -1 if self.converged else None

    def training_step(self, _batch, batch_idx):
        hidden = hidden_states(self.model, self.batch)
        loss, nll = objective(
            batch_target_log_probs(self.model, hidden, self.batch), self.batch.n_target, self.direction
        )
        loss_value, nll_value = torch.stack([loss.detach(), nll.detach()]).tolist()  # one sync
        if not (math.isfinite(loss_value) and math.isfinite(nll_value)):
            raise EditFailed("ft", f"non-finite loss {loss_value} at step {batch_idx}")
        self.losses.append(loss_value)
        self.nlls.append(nll_value)
        stop = self.hp.early_stop_loss
        if self.direction == "maximize" and stop is not None and nll_value < stop:
            self.converged = True
            return None
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        closure = optimizer_closure
        if any(m is not None for m in self.masters):

            def closure():
                loss = optimizer_closure()
                for param, master in zip(self.trained, self.masters, strict=True):
                    if master is not None:
                        pass_gradient_to_master(param, master)
                return loss

        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        self.project_to_linf_ball()

    @torch.no_grad()
    def project_to_linf_ball(self) -> None:
        """Clamp every trained weight back into [original - eps, original + eps]."""
        for param, master, bounds in zip(self.trained, self.masters, self.bounds, strict=True):
            stepped = param if master is None else master
            self.max_overshoot = max(self.max_overshoot, overshoot(stepped, bounds, self.eps))
        for param, master, master_bounds in zip(
            self.trained, self.masters, self.master_bounds, strict=True
        ):
            if master is not None:
                round_master_into(param, master, master_bounds)
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.trained]).all()):
            raise EditFailed("ft", "non-finite weights after an optimiser step")
        for param, bounds in zip(self.trained, self.bounds, strict=True):
            clamp_into(param, bounds)


def is_half(param: torch.Tensor) -> bool:
    """bfloat16 and float16 weights train through float32 master copies."""
    return param.dtype in (torch.float16, torch.bfloat16)


def pass_gradient_to_master(weight: torch.Tensor, master: torch.Tensor) -> None:
    """Hand a half-precision weight's gradient to its float32 master (what Adam steps) and
    clear the weight's: the optimiser zeroes only the masters, so a gradient left on the
    weight would be added to the next step's."""
    master.grad = None if weight.grad is None else weight.grad.float()
    weight.grad = None


def overshoot(stepped: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor], eps: float) -> float:
    """How far a step left the ball [lo, hi], in units of its radius ``eps`` (<= 0 inside)."""
    lo, hi = bounds
    stepped = stepped.float()
    return float(torch.maximum(stepped - hi.float(), lo.float() - stepped).max()) / eps


def clamp_into(weight: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Project ``weight`` into [lo, hi] in place (the L-inf ball of constrained finetuning)."""
    lo, hi = bounds
    weight.copy_(torch.maximum(torch.minimum(weight, hi), lo))


def round_master_into(
    weight: torch.Tensor, master: torch.Tensor, master_bounds: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Project a float32 master into its ball, then make the weight the master rounded to the
    weight's dtype (the weight is projected into its own ball after)."""
    clamp_into(master, master_bounds)
    weight.copy_(master.to(weight.dtype))


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's info lines and data-loader warnings are noise for a 25-step fit."""
    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def fit(
    module: pl.LightningModule, model: nn.Module, batch: EditBatch, n_frozen: int, steps: int
) -> None:
    """Run ``module``'s training loop for at most ``steps`` steps with a quiet ``Trainer`` on
    the model's device (no logger, checkpoints or files left), the layers below ``n_frozen``
    computed once for ``batch`` and replayed."""
    with _quiet_lightning(), tempfile.TemporaryDirectory(prefix="locedit-ft-") as root:
        accelerator, devices = lightning_devices(model_device(model))
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=devices,
            max_epochs=1,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
        )
        with frozen_layers(model, lambda: hidden_states(model, batch), n_frozen):
            trainer.fit(module)


def _trained(
    model: nn.Module, batch: EditBatch, names: list[str], hp: FTHParams, direction: Direction,
    layers: list[int],
) -> ConstrainedFinetune:
    """Train the weights ``names`` in place (the Trainer's fit of :class:`ConstrainedFinetune`)."""
    module = ConstrainedFinetune(model, batch, names, hp, direction)
    flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    named = dict(model.named_parameters())
    try:
        for name in names:
            named[name].requires_grad_(True)
        fit(module, model, batch, min(layers), hp.steps)
    finally:
        for name, flag in flags_before.items():
            named[name].requires_grad_(flag)
        model.train(was_training)
        for param in model.parameters():
            param.grad = None
    return module


def apply_finetune(edit: EditCall) -> EditResult:
    """Finetune ``edit.model`` in place; the caller (:func:`locedit.editing.edited`) restores it.
    ``edit.vstars`` may bring the outcome of a batched run
    (:func:`locedit.editing.grouped_finetune.grouped_finetune`): its weights are written
    instead of training."""
    model, tokenizer, request, method = edit.model, edit.tokenizer, edit.request, edit.method
    layer, layers = edit.layer, edit.layers
    hp: FTHParams = edit.hparams
    if hp.steps < 1:
        raise ValueError("FT needs steps >= 1")
    target_ids = encode_target(tokenizer, request.prompt, request.target)
    batch = build_batch(
        tokenizer, request, target_ids, pad_id=pad_token_id(model), device=model_device(model)
    )
    names = finetuned_param_names(model, layers, hp.params)
    named = dict(model.named_parameters())
    originals = {name: named[name].detach().clone() for name in names}
    given = edit.vstars[0] if edit.vstars else None  # a batched run's outcome (issue 28)
    if isinstance(given, EditFailed):
        raise given
    if given is not None:
        with torch.no_grad():
            for name in names:
                named[name].copy_(given.weights[name])
        losses, nlls, max_overshoot = given.losses, given.nlls, given.max_overshoot
        eps = effective_linf_eps(hp, d_mlp(model))
    else:
        module = _trained(model, batch, names, hp, request.direction, layers)
        losses, nlls, max_overshoot, eps = module.losses, module.nlls, module.max_overshoot, module.eps
    with torch.no_grad():
        hidden = hidden_states(model, batch)
        loss_after, nll_after = objective(
            batch_target_log_probs(model, hidden, batch), batch.n_target, request.direction
        )
    diagnostics: dict[str, float] = {
        "ft_steps": float(len(losses)),
        "ft_loss_first": losses[0] if losses else math.nan,
        "ft_loss_last": losses[-1] if losses else math.nan,
        "ft_target_prob_first": math.exp(-nlls[0]) if nlls else math.nan,
        "ft_target_prob_after": math.exp(-float(nll_after)),
        "linf_eps": eps,
        "ft_max_overshoot": max_overshoot,
    }
    max_change, change_sq, original_sq = 0.0, 0.0, 0.0
    for name in names:
        change = named[name].detach().double() - originals[name].double()
        max_change = max(max_change, float(change.abs().max()))
        change_sq += float(change.square().sum())
        original_sq += float(originals[name].double().square().sum())
    diagnostics["max_abs_change"] = max_change
    # ||dtheta|| / ||theta|| over all trained parameters together (biases may start at zero).
    diagnostics["update_norm_ratio"] = (
        math.sqrt(change_sq / original_sq) if original_sq else math.inf
    )
    return EditResult(
        method=method,
        layer=layer,
        layers=list(layers),
        diagnostics=diagnostics,
        hparams=hp.to_dict(),
        flags=finetune_flags(max_overshoot, losses, float(loss_after)),
    )


#: An optimiser step that leaves the ball by this many radii is an exploding step (a huge
#: learning rate): the projection, not the gradient, then decides the edit.
EXPLODING_OVERSHOOT = 1e3


def finetune_flags(max_overshoot: float, losses: list[float], loss_after: float) -> list[str]:
    """Like ROME's ``v_step_zeroed`` / ``v_no_progress``: ``ft_step_exploded`` when a step left
    the L-infinity ball by more than :data:`EXPLODING_OVERSHOOT` radii (or not finitely);
    ``ft_no_progress`` when the edit did not lower the objective below its first value."""
    flags = []
    if not max_overshoot <= EXPLODING_OVERSHOOT:
        flags.append("ft_step_exploded")
    if len(losses) > 1 and not loss_after < losses[0]:
        flags.append("ft_no_progress")
    return flags
