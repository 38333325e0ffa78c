"""One interface to every editing method: a ``with`` block that edits and always restores.

with edited(model, tok, method, request, layer, hparams, covariance) as result:
    ...  # the model is edited here
# the model is bit-identical to before, verified, even if the block or the edit raised
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from locedit.editing.covariance import CovarianceStore
from locedit.editing.hparams import HParams, VStarHParams
from locedit.editing.methods import EditMethod, check_batch, get_method
from locedit.editing.types import EditFailed, EditRequest, EditResult, GroupedEdit
from locedit.models.architecture import n_layers
from locedit.models.snapshot import preserved_weights

log = logging.getLogger(__name__)


def layers_for(
    method: str, layer: int, model: nn.Module, hparams: HParams | None = None
) -> list[int]:
    """The layers an edit of ``method`` at ``layer`` changes on this model."""
    return get_method(method).layers(layer, n_layers(model), hparams)


def touched_params(method: str, model: nn.Module, layers: list[int], hparams: HParams) -> list[str]:
    """Names of every parameter the edit may change (what the snapshot must cover)."""
    return get_method(method).params(model, layers, hparams)


def context_templates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    hparams: VStarHParams,
    covariance: CovarianceStore | None,
) -> list[str]:
    """The method's context templates, from the store (generated once per model and seed)."""
    if hparams.n_context_templates == 0 or not hparams.context_template_lengths:
        return ["{}"]
    if covariance is None or not hasattr(covariance, "context_templates"):
        raise ValueError(
            "this method needs a CovarianceStore (key statistics and context templates)"
        )
    return covariance.context_templates(
        model,
        tokenizer,
        hparams.context_template_lengths,
        hparams.n_context_templates,
        hparams.seed,
        hparams.template_top_k,
    )


def prepared(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    method: str,
    layer: int,
    hparams: HParams | None,
    covariance: CovarianceStore | None,
    co_requests: Sequence[EditRequest] = (),
) -> tuple[EditMethod, HParams, list[int], list[str] | None]:
    """The method's registry entry, its (checked) hyperparameters, the layers the edit
    touches and its context templates: what every run of an edit starts from."""
    spec = get_method(method)
    hparams = hparams if hparams is not None else spec.hparams_from()
    if not isinstance(hparams, spec.hparams):
        raise TypeError(f"{method} needs {spec.hparams.__name__}, got {type(hparams).__name__}")
    check_batch(method, hparams, co_requests)
    layers = spec.layers(layer, n_layers(model), hparams)
    templates = (
        context_templates(model, tokenizer, hparams, covariance) if spec.needs_key_stats else None
    )
    return spec, hparams, layers, templates


@contextmanager
def edited(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    method: str,
    request: EditRequest,
    layer: int,
    hparams: HParams | None = None,
    covariance: CovarianceStore | None = None,
    co_requests: Sequence[EditRequest] = (),
    vstars: Sequence = (),
) -> Iterator[EditResult]:
    """Apply one edit in place for the duration of the block and yield its :class:`EditResult`.

    On exit the touched weights are restored and verified bit-identical
    (:func:`locedit.models.preserved_weights`), also when the edit or the block raises. An
    edit that hits NaN/Inf in a loss or update raises :class:`EditFailed` after restoring.
    ``method`` names a :data:`~locedit.editing.methods.REGISTRY` entry; ``covariance`` (a
    :class:`CovarianceStore`) is required by the methods that need key statistics.
    ``co_requests`` are edited together with ``request`` in the same update: exactly
    ``hparams.batch_size - 1`` of them (MEMIT, EMMET, AlphaEdit); a method without a
    ``batch_size`` refuses any (:func:`~locedit.editing.methods.check_batch`). The result
    describes ``request``. ``vstars``: the edit's v*/z* already optimised in a batch with
    other edits (:func:`optimise_together`); empty, the method optimises its own.
    """
    spec, hparams, layers, templates = prepared(
        model, tokenizer, method, layer, hparams, covariance, co_requests
    )
    names = spec.params(model, layers, hparams)
    with preserved_weights(model, names) as snapshot:
        start = time.perf_counter()
        try:
            result = spec.run(
                model,
                tokenizer,
                request,
                layer,
                layers,
                hparams,
                covariance,
                templates,
                co_requests,
                vstars,
            )
        except EditFailed as err:
            raise EditFailed(method, err.reason) from err
        except FloatingPointError as err:
            raise EditFailed(method, str(err)) from err
        result.method = method
        result.seconds = time.perf_counter() - start
        result.changed = snapshot.changed()
        params = dict(model.named_parameters())
        for name in result.changed:
            if not bool(torch.isfinite(params[name]).all()):
                raise EditFailed(method, f"non-finite weights in {name}")
        if not result.changed:
            result.flags.append("no_change")
        if result.flags:
            log.warning(
                "%s edit at layer %d flagged %s: %s",
                method,
                layer,
                result.flags,
                {
                    k: round(v, 4)
                    for k, v in result.diagnostics.items()
                    if k.startswith(("division", "update_norm_ratio"))
                },
            )
        log.debug(
            "%s edit at layer %d took %.2f s; flags %s", method, layer, result.seconds, result.flags
        )
        yield result


def optimise_together(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    edits: Sequence[GroupedEdit],
    covariance: CovarianceStore | None = None,
) -> list[tuple]:
    """Each edit's optimisation outcome (the ``vstars`` that :func:`edited` takes), the edits of
    each method run as one batch by the method's ``batched_fit`` (issue 28): v*/z* for ROME,
    MEMIT, EMMET and AlphaEdit, trained weights for FT-1/FT-5. An edit whose method has none
    gets ``()``; an optimisation that fails comes back as its :class:`EditFailed` and fails
    only its edit. A batch that cannot run at all (e.g. finetuning a module that is not
    Linear or Conv1D) raises
    ``ValueError`` and the caller makes those edits one at a time."""
    out: list[tuple] = [()] * len(edits)
    by_method: dict[str, list[int]] = {}
    for index, edit in enumerate(edits):
        by_method.setdefault(edit.method, []).append(index)
    for method, members in by_method.items():
        spec = get_method(method)
        if not spec.groupable:
            continue
        found = spec.fit_together(model, tokenizer, [edits[i] for i in members], covariance)
        for index, outcome in zip(members, found, strict=True):
            out[index] = outcome
    return out
