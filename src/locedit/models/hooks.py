"""One intervention toolkit: record, edit and short-circuit module outputs inside ``with`` blocks.

In the spirit of nethook's ``Trace``/``TraceDict`` (kmeng01/rome ``util/nethook.py``): every
intervention is a context manager that installs its hooks on entry and removes them on exit,
also when the body raises, and puts back exactly what was there before (an instance-level
``forward`` such as an accelerate offloading wrapper included). Causal Tracing's restorations
(paper §3.2), representation zeroing (App. B), the noised subject of Tracing Reversal and Fact
Forcing (§5.1) and the v*/z optimisations of ROME and MEMIT (§5.2) all intervene through these
functions, so the same module outputs change in the same way everywhere.

* :func:`recorded`, :func:`watched`: read a module's first output (or every call) during the body;
* :func:`edited_output`, :func:`edited_outputs`: replace or edit a module's hidden-state output;
* :func:`edited_from_inputs`: edit it from the module's input too (a weight change in the forward);
* :func:`run_until`: run a forward only as far as a module (the rest is never computed);
* :func:`replaced_forward`: stand-in ``forward`` methods, the previous ones restored on exit;
* :func:`frozen_layers`: compute the layers below a point once, then replay their outputs;
* :func:`window_layers`: the layers of the window centred on a layer (the one formula).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from locedit.models.architecture import arch_spec, get_module

K = TypeVar("K", bound=Hashable)

#: A function that rewrites a module's hidden-state output (returns a new tensor).
Edit = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- outputs


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (a tensor, or the first item of a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def map_hidden(output: Any, fn: Edit) -> Any:
    """``output`` with its hidden-state tensor replaced by ``fn(hidden)``, other items kept."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"cannot patch a module output of type {type(output).__name__}")


def detached(output: Any) -> Any:
    """A module output with every tensor (also inside tuples) detached."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(detached(o) for o in output)
    return output


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (from the architecture table)."""
    return get_module(model, arch_spec(model).layers)


def window_layers(layer: int, window: int, total: int) -> range:
    """Layers of the window centred on ``layer``, clipped (not shifted) at the model's ends.

    ROME's convention, shared by Causal Tracing's restoration window (§3.2) and the layers
    MEMIT and FT-5 edit (§5.2, App. Fig. 11): ``[layer - window // 2, layer + ceil(window /
    2))``, so window 5 at layer l is l-2..l+2 and window 10 is l-5..l+4.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return range(max(0, layer - window // 2), min(total, layer - (-window // 2)))


# --------------------------------------------------------------------------- hooks


@contextmanager
def _hooks(register: Callable[[], list]) -> Iterator[None]:
    handles: list = []
    try:
        handles.extend(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


def _keep_output(_inputs: tuple, output: Any) -> Any:
    return detached(output)


@contextmanager
def watched(
    modules: Mapping[K, nn.Module], see: Callable[[K, tuple, Any], None]
) -> Iterator[None]:
    """Call ``see(key, inputs, output)`` after every forward call of ``modules[key]`` (outputs
    unchanged); hooks go away on exit."""

    def hook(key, _module, inputs, output):
        see(key, inputs, output)

    def register():
        return [
            module.register_forward_hook(functools.partial(hook, key))
            for key, module in modules.items()
        ]

    with _hooks(register):
        yield


@contextmanager
def recorded(
    modules: Mapping[K, nn.Module],
    read: Callable[[tuple, Any], Any] = _keep_output,
) -> Iterator[dict[K, Any]]:
    """Record ``read(inputs, output)`` of each module's first forward call, keyed like
    ``modules`` (by default the detached output). Hooks go away on exit."""
    records: dict[K, Any] = {}

    def see(key, inputs, output):
        if key not in records:
            records[key] = read(inputs, output)

    with watched(modules, see):
        yield records


@contextmanager
def recorded_inputs(modules: Mapping[K, nn.Module]) -> Iterator[dict[K, torch.Tensor]]:
    """Record the hidden-state input (first positional argument or ``hidden_states``) of each
    module's first call, detached."""
    records: dict[K, torch.Tensor] = {}

    def hook(key, _module, args, kwargs):
        if key not in records:
            records[key] = (args[0] if args else kwargs["hidden_states"]).detach()

    def register():
        return [
            module.register_forward_pre_hook(functools.partial(hook, key), with_kwargs=True)
            for key, module in modules.items()
        ]

    with _hooks(register):
        yield records


@contextmanager
def edited_outputs(modules: Mapping[K, nn.Module], edits: Mapping[K, Edit]) -> Iterator[None]:
    """Replace the hidden-state output ``h`` of ``modules[k]`` by ``edits[k](h)`` for every
    key of ``edits``, at every forward call in the body."""
    from_inputs = {key: functools.partial(_output_only, edit) for key, edit in edits.items()}
    with edited_from_inputs(modules, from_inputs):
        yield


def _output_only(edit: Edit, _inputs: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    return edit(hidden)


@contextmanager
def edited_from_inputs(
    modules: Mapping[K, nn.Module],
    edits: Mapping[K, Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]],
) -> Iterator[None]:
    """Replace the hidden-state output ``h`` of ``modules[k]`` by ``edits[k](x, h)``, ``x``
    the module's first positional input, at every forward call in the body (a weight change
    applied in the forward: ``h + x dW^T``)."""

    def hook(edit, _module, inputs, output):
        first = inputs[0] if inputs else None  # None: called with keyword arguments only
        return map_hidden(output, lambda hidden: edit(first, hidden))

    def register():
        return [
            modules[key].register_forward_hook(functools.partial(hook, edit))
            for key, edit in edits.items()
        ]

    with _hooks(register):
        yield


@contextmanager
def edited_output(module: nn.Module, edit: Edit) -> Iterator[None]:
    """Replace the hidden-state output ``h`` of ``module`` by ``edit(h)`` during the body."""
    with edited_outputs({0: module}, {0: edit}):
        yield


class StopForward(Exception):
    """Raised by a hook once everything a forward was run for has been seen."""


def run_until(forward: Callable[[], object], module: nn.Module) -> None:
    """Call ``forward`` (no grad) but stop it right after ``module`` has produced its output.

    Hooks that record on the way (see :func:`recorded`) have seen everything up to ``module``;
    nothing above it is computed.
    """

    def stop(_module, _inputs, _output):
        raise StopForward

    with _hooks(lambda: [module.register_forward_hook(stop)]):
        try:
            with torch.no_grad():
                forward()
        except StopForward:
            pass


@contextmanager
def replaced_forward(
    modules: Sequence[nn.Module], forwards: Sequence[Callable[..., Any]]
) -> Iterator[None]:
    """Give each module an instance-level ``forward`` for the body.

    On exit each module gets back exactly what it had: its previous instance-level
    ``forward`` (e.g. an accelerate offloading wrapper), or none, so the class's applies again.
    Forward hooks still run around a replaced ``forward``.
    """
    previous = [module.__dict__.get("forward") for module in modules]
    try:
        for module, forward in zip(modules, forwards, strict=True):
            module.forward = forward
        yield
    finally:
        for module, before in zip(modules, previous, strict=True):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before


def _replay(output, *_args, **_kwargs):
    return output


@contextmanager
def frozen_layers(model: nn.Module, forward: Callable[[], object], n_frozen: int) -> Iterator[None]:
    """Run decoder layers ``0 .. n_frozen - 1`` once through ``forward``, then replay them.

    Inside the block every call of ``forward`` (the same inputs each time) recomputes only the
    layers from ``n_frozen`` on. Valid while those lower layers' weights and the inputs stay
    unchanged, which holds during an optimisation of a layer at or above ``n_frozen``
    (DESIGN.md §7: ROME's v* never changes the layers below the edit). Forward hooks on the
    frozen layers still run on the replayed output.
    """
    layers = list(decoder_layers(model))[:n_frozen]
    if not layers:
        yield
        return
    with recorded(dict(enumerate(layers))) as records:
        run_until(forward, layers[-1])
    replays = [functools.partial(_replay, records[i]) for i in range(len(layers))]
    with replaced_forward(layers, replays):
        yield
