"""Causal Tracing (paper §3.2, §4.1): the straightforward reference and an exact fast path.

Both give the same :class:`TraceResult` (to float rounding): the token x layer grid of
p(o_true | s_noise, r, restored clean outputs), averaged over noise samples.

The fast path uses only facts about causal decoders, no approximation:

* a restoration at token t changes nothing at positions before t, so those positions keep the
  noised run's keys and values (reused from its KV cache) and are never recomputed (unless a
  block also carries a recurrent or convolutional mixer, whose state at t the cache does not
  keep: then every position is recomputed);
* tokens before the first subject token are clean in the noised run already, so restoring
  them has exactly zero effect: their row of the grid is p_noised;
* nothing changes below the first restored layer ``lo`` of a window, so a restoration starts
  from the noised run's input to layer ``lo``; all windows of one token run together, and the
  batch grows layer by layer as windows start;
* logits only at the object positions, never over the whole prompt.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from locedit.data.records import FactRecord
from locedit.models.architecture import (
    Component,
    arch_spec,
    block_returns_tuple,
    get_module,
    n_layers,
)
from locedit.models.device import attention_without_cudnn, model_device
from locedit.models.hooks import (
    decoder_layers,
    hidden_of,
    recorded_inputs,
    replaced_forward,
    window_layers,
)
from locedit.models.noise import NoiseSource, noised_subject
from locedit.tracing.patching import (
    TracingInput,
    captured_components,
    check_kind,
    encode_fact,
    patched_components,
    patched_target_probs,
    set_positions,
    target_probs_from_final,
    target_probs_from_logits,
    tracing_noise,
)
from locedit.tracing.results import TraceResult

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reference


@torch.no_grad()
@attention_without_cudnn()
def trace_fact_reference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    fact: FactRecord,
    *,
    sigma: float | None = None,
    seed: int = 0,
    kind: str = "mlp",
    window: int = 5,
    n_samples: int = 10,
    min_denominator: float = 0.01,
    noise: NoiseSource | None = None,
) -> TraceResult:
    """The straightforward algorithm of the original research code (ROME's
    ``calculate_hidden_flow``): one patched forward pass of the full model per (token, layer
    window), batched only over the noise samples. Slow; the ground truth for :func:`trace_fact`.

    The noise is the fact's seeded s_noise of level ``sigma``, or ``noise`` itself (a tensor
    [n_samples, n_subject_tokens, d_model] or a function of that shape) to reproduce another
    implementation's noise exactly.
    """
    kind = check_kind(kind)
    inp = encode_fact(tokenizer, fact)
    noise = tracing_noise(model, inp, sigma, seed, n_samples, noise)
    n_samples = int(noise.shape[0])
    total = n_layers(model)
    with torch.no_grad(), captured_components(model, kind, range(total)) as clean:
        logits = model(input_ids=inp.ids(1, model_device(model))).logits
    p_clean = float(target_probs_from_logits(logits[:, inp.target_positions], inp.target_ids)[0])
    p_noised = float(patched_target_probs(model, inp, noise, kind, {}).mean())
    grid = np.zeros((inp.n_prompt, total))
    for token in range(inp.n_prompt):
        for layer in range(total):
            patches = {
                j: set_positions(slice(None), token, clean[j][0, token])
                for j in window_layers(layer, window, total)
            }
            grid[token, layer] = float(
                patched_target_probs(model, inp, noise, kind, patches).mean()
            )
    return _result(inp, kind, window, p_clean, p_noised, grid, n_samples, sigma, min_denominator)


def _result(
    inp, kind, window, p_clean, p_noised, grid, n_samples, sigma, min_denominator
) -> TraceResult:
    return TraceResult(
        **inp.result_fields(kind, window),
        p_clean=float(p_clean),
        p_noised=float(p_noised),
        p_restored=np.asarray(grid, dtype=np.float64),
        n_samples=int(n_samples),
        sigma=float("nan") if sigma is None else float(sigma),
        min_denominator=float(min_denominator),
    )


# --------------------------------------------------------------------------- fast path


def trace_fact(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    fact: FactRecord,
    *,
    kind: str = "mlp",
    window: int = 5,
    **options,
) -> TraceResult:
    """Causal Tracing of one fact, fast and exact (same numbers as :func:`trace_fact_reference`).

    ``options`` are those of :func:`trace_fact_many`: ``sigma`` and ``seed`` or the ``noise``
    itself, ``n_samples``, ``min_denominator``.
    """
    return trace_fact_many(model, tokenizer, fact, kinds=(kind,), windows=(window,), **options)[0]


@torch.no_grad()
@attention_without_cudnn()  # bfloat16 on Hopper: a cuDNN plan for each of hundreds of shapes
def trace_fact_many(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    fact: FactRecord,
    *,
    sigma: float | None = None,
    seed: int = 0,
    kinds: Sequence[str] = ("mlp",),
    windows: Sequence[int] = (5,),
    n_samples: int = 10,
    min_denominator: float = 0.01,
    noise: NoiseSource | None = None,
) -> list[TraceResult]:
    """Fast tracing for every (kind, window) of one fact, sharing its clean and noised runs.

    Results come in the order ``[(k, w) for k in kinds for w in windows]``. The noise is the
    fact's seeded s_noise of level ``sigma``, or ``noise`` itself (a tensor [n_samples,
    n_subject_tokens, d_model] or a function of that shape, see :mod:`locedit.models.noise`).
    """
    kinds = [check_kind(k) for k in kinds]
    inp = encode_fact(tokenizer, fact)
    noise = tracing_noise(model, inp, sigma, seed, n_samples, noise)
    n_samples = int(noise.shape[0])
    runs = FactRuns.compute(model, inp, noise, kinds)
    return [
        _result(
            inp,
            kind,
            window,
            runs.p_clean,
            runs.p_noised,
            runs.trace_grid(kind, window),
            n_samples,
            sigma,
            min_denominator,
        )
        for kind in kinds
        for window in windows
    ]


def _cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument (transformers renamed ``past_key_values`` to ``cache``)."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextmanager
def _recording_layers(layers: nn.ModuleList, as_tuple: bool = False):
    """Replace each decoder layer by an identity that records how the model calls it.

    One cheap pass through the model's own forward then yields the exact per-layer arguments
    (attention masks incl. sliding windows, rotary embeddings, position ids) for a given
    prefix/query geometry, without running any layer. Yields the list of calls.
    """
    calls: list[tuple[tuple, dict] | None] = [None] * len(layers)

    def make(index: int):
        def record(*args, **kwargs):
            calls[index] = (args, kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if as_tuple else hidden

        return record

    with replaced_forward(list(layers), [make(i) for i in range(len(layers))]):
        yield calls


@dataclass
class FactRuns:
    """The clean and noised runs of one fact, kept to serve every restoration.

    ``clean[kind][l]``: clean ``kind`` output of layer l, [seq, d]. ``layer_inputs[l]``: the
    noised run's input to layer l, [n_samples, seq, d]. ``kv[l]``: the noised run's keys and
    values at layer l (None when the model's cache cannot be reused, e.g. a sliding window
    shorter than the prompt or a hybrid block's mixer state; then every restoration recomputes
    all positions).
    """

    model: nn.Module
    inp: TracingInput
    noise: torch.Tensor
    clean: dict[str, list[torch.Tensor]]
    p_clean: float
    p_noised_samples: torch.Tensor
    layer_inputs: list[torch.Tensor]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None

    @property
    def p_noised(self) -> float:
        return float(self.p_noised_samples.mean())

    @classmethod
    def compute(
        cls, model: nn.Module, inp: TracingInput, noise: torch.Tensor, kinds: Sequence[Component]
    ) -> FactRuns:
        total = n_layers(model)
        base = model.base_model
        layers = decoder_layers(model)
        n_samples = noise.shape[0]
        device = model_device(model)
        clean: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            with ExitStack() as stack:
                stores = {
                    k: stack.enter_context(captured_components(model, k, range(total)))
                    for k in kinds
                }
                hidden = base(input_ids=inp.ids(1, device)).last_hidden_state
            for kind in kinds:
                clean[kind] = [stores[kind][j][0] for j in range(total)]
            p_clean = float(
                target_probs_from_final(model, hidden[:, inp.target_positions], inp.target_ids)[0]
            )

            with (
                recorded_inputs(dict(enumerate(layers))) as recorded,
                noised_subject(model, inp.subject_start, inp.subject_end, noise),
            ):
                cache = DynamicCache(config=model.config)
                out = base(
                    input_ids=inp.ids(n_samples, device), use_cache=True, **{_cache_kwarg(model): cache}
                )
            inputs = [recorded[j] for j in range(total)]
            p_noised = target_probs_from_final(
                model, out.last_hidden_state[:, inp.target_positions], inp.target_ids
            )
        return cls(
            model,
            inp,
            noise,
            clean,
            p_clean,
            p_noised,
            inputs,
            _reusable_kv(cache, total, len(inp.input_ids)),
        )

    # ----------------------------------------------------------------------- restorations

    def trace_grid(self, kind: Component, window: int) -> np.ndarray:
        """p_restored[t, l] for every token and window centre (mean over noise samples)."""
        total = len(self.layer_inputs)
        n_samples = self.noise.shape[0]
        grid = np.full((self.inp.n_prompt, total), self.p_noised)
        # Tokens before the subject are clean in the noised run: restoring them is a no-op.
        tokens = list(range(self.inp.subject_start, self.inp.n_prompt))
        rows = self._restoration_rows(window)
        finals = torch.cat([self._restore_token(kind, rows, token) for token in tokens])
        # One pass over the output embedding for all restorations of the fact.
        probs = target_probs_from_final(self.model, finals, self.inp.target_ids)
        grid[tokens] = probs.view(len(tokens), total, n_samples).mean(-1).cpu().numpy()
        return grid

    def _restoration_rows(self, window: int) -> RestorationRows:
        """Which rows each layer restores, for every token of the grid: computed once, on the
        CPU, and moved to the model's device in one copy (on a GPU, a copy or an index
        computed from data inside the layer loop would wait for the GPU every layer)."""
        total = len(self.layer_inputs)
        n_samples = self.noise.shape[0]
        spans = [window_layers(layer, window, total) for layer in range(total)]
        starts = torch.tensor([span.start for span in spans], device="cpu")
        ends = torch.tensor([span.stop for span in spans], device="cpu")
        # Rows are (window centre, sample), centres in order, so rows whose window has started
        # by layer j form a prefix of the batch that grows with j.
        row_centre = torch.arange(total, device="cpu").repeat_interleave(n_samples)
        active_at = [int((starts <= j).sum()) * n_samples for j in range(total)]
        first = int(starts.min())
        restored = []
        for j in range(first, total):
            centres = row_centre[: active_at[j]]
            restored.append(torch.nonzero((starts[centres] <= j) & (j < ends[centres]))[:, 0])
        device = model_device(self.model)
        on_device = torch.cat(restored).to(device).split([len(r) for r in restored])
        return RestorationRows(
            first=first, active_at=active_at, restored=(None,) * first + tuple(on_device),
            sample=torch.arange(n_samples, device=device).repeat(total),
        )

    def _restore_token(self, kind: Component, rows: RestorationRows, token: int) -> torch.Tensor:
        """Final-norm hidden states at the object positions, restoring at ``token``.

        Returns [window centres x samples, n_target, d], centre-major.
        """
        model = self.model
        total = len(self.layer_inputs)
        active_at = rows.active_at
        prefix = token if self.kv is not None else 0
        position = token - prefix
        calls = self._layer_calls(prefix)
        cache = self._prefix_cache(prefix, rows.sample, active_at)
        layers = decoder_layers(model)
        hidden: torch.Tensor | None = None
        with torch.no_grad():
            for j in range(rows.first, total):
                n_active = active_at[j]
                n_have = 0 if hidden is None else hidden.shape[0]
                if n_active > n_have:
                    fresh = self.layer_inputs[j][rows.sample[n_have:n_active], prefix:]
                    hidden = fresh if hidden is None else torch.cat([hidden, fresh])
                patch = set_positions(rows.restored[j], position, self.clean[kind][j][token])
                args, kwargs = calls[j].build(hidden.shape[0], cache)
                if kind == "resid":
                    hidden = patch(hidden_of(layers[j](hidden, *args[1:], **kwargs)))
                else:
                    with patched_components(model, kind, {j: patch}):
                        hidden = hidden_of(layers[j](hidden, *args[1:], **kwargs))
            final = get_module(model, arch_spec(model).final_norm)
            targets = [p - prefix for p in self.inp.target_positions]
            return final(hidden[:, targets])

    def _layer_calls(self, prefix: int) -> list[LayerCall]:
        """Per-layer call arguments for queries at positions >= prefix (see _recording_layers),
        recorded for batches of 1 and 2 rows so that each restored batch gets its own."""
        recorded = [self._record_calls(prefix, rows) for rows in (1, 2)]
        return [LayerCall.from_pair(one, two) for one, two in zip(*recorded, strict=True)]

    def _record_calls(self, prefix: int, rows: int) -> list[tuple[tuple, dict]]:
        model = self.model
        kwargs = {}
        if prefix > 0:
            probe_cache = DynamicCache(config=model.config)
            for j, (keys, values) in enumerate(self.kv):
                probe_cache.update(
                    keys[:1, :, :prefix].expand(rows, -1, -1, -1),
                    values[:1, :, :prefix].expand(rows, -1, -1, -1),
                    j,
                )
            kwargs = {_cache_kwarg(model): probe_cache, "use_cache": True}
        with torch.no_grad(), _recording_layers(
            decoder_layers(model), block_returns_tuple(model)
        ) as calls:
            ids = self.inp.ids(rows, model_device(model))[:, prefix:]
            model.base_model(input_ids=ids, **kwargs)
        return [
            _swap_cache(call, kwargs.get(_cache_kwarg(model)), _CACHE) for call in calls
        ]

    def _prefix_cache(
        self, prefix: int, row_sample: torch.Tensor, active_at: list[int]
    ) -> DynamicCache | None:
        """Noised keys/values of positions < prefix for each layer's active rows."""
        if prefix == 0:
            return None
        cache = DynamicCache(config=self.model.config)
        for j, (keys, values) in enumerate(self.kv):
            rows = row_sample[: max(active_at[j], 1)]
            cache.update(keys[rows, :, :prefix], values[rows, :, :prefix], j)
        return cache


@dataclass(frozen=True)
class RestorationRows:
    """The rows of one restoration batch (window centre x noise sample, centre-major) by layer:
    ``active_at[j]`` rows have entered by layer j (their window has started), of which
    ``restored[j]`` (on the model's device) restore at layer j; layers below ``first`` restore
    none; ``sample[r]`` is row r's noise sample."""

    first: int
    active_at: list[int]
    restored: tuple[torch.Tensor | None, ...]
    sample: torch.Tensor


def _swap_cache(call: tuple[tuple, dict], old, new) -> tuple[tuple, dict]:
    args, kwargs = call
    if old is None:
        return args, kwargs
    args = tuple(new if a is old else a for a in args)
    kwargs = {k: (new if v is old else v) for k, v in kwargs.items()}
    return args, kwargs


#: Stands for the restoration's prefix cache in a recorded layer call.
_CACHE = object()


@dataclass(frozen=True)
class LayerCall:
    """How the model calls one decoder layer, for any number of identical rows.

    Recorded at batch 1 and batch 2 (:meth:`FactRuns._layer_calls`): a tensor whose first
    dimension doubles between them, and whose batch-2 value is the batch-1 value repeated, is
    per row (attention masks, ALiBi biases, position ids) and is repeated to the restored
    batch's row count; everything else (rotary tables, cache positions) is passed as recorded.
    A layer that checks its mask's batch size (issue 26) then sees its own row count.
    """

    args: tuple
    kwargs: dict

    @classmethod
    def from_pair(cls, one: tuple[tuple, dict], two: tuple[tuple, dict]) -> LayerCall:
        args = tuple(_per_row(a, b) for a, b in zip(one[0], two[0], strict=True))
        kwargs = {k: _per_row(v, two[1][k]) for k, v in one[1].items()}
        return cls(args, kwargs)

    def build(self, rows: int, cache) -> tuple[tuple, dict]:
        args = tuple(_for_rows(a, rows, cache) for a in self.args)
        return args, {k: _for_rows(v, rows, cache) for k, v in self.kwargs.items()}


@dataclass(frozen=True)
class _PerRow:
    value: torch.Tensor  # the batch-1 value


def _per_row(one, two):
    if isinstance(one, tuple) and isinstance(two, tuple) and len(one) == len(two):
        return tuple(_per_row(a, b) for a, b in zip(one, two, strict=True))
    if isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor) and one.dim() > 0:
        if two.shape[0] == 2 * one.shape[0] and two.shape[1:] == one.shape[1:]:
            if not torch.equal(two, torch.cat([one, one])):
                raise ValueError("a decoder layer argument differs between identical rows")
            return _PerRow(one)
    return one


def _for_rows(value, rows: int, cache):
    if value is _CACHE:
        return cache
    if isinstance(value, _PerRow):
        tensor = value.value
        return tensor if rows == 1 else tensor.repeat(rows, *([1] * (tensor.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_for_rows(v, rows, cache) for v in value)
    return value


#: Cache-layer attributes of mixers with their own state (transformers' linear-attention,
#: state-space and convolution layers).
_MIXER_STATES = ("conv_states", "recurrent_states", "ssm_states")


def _holds(state) -> bool:
    return state is not None and not (isinstance(state, dict) and not state)


def _reusable_kv(cache, total: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) of the noised run, if every layer kept all positions."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) < total:
        return None
    kv = []
    for layer in layers[:total]:
        if any(_holds(getattr(layer, name, None)) for name in _MIXER_STATES):
            # A recurrent or convolutional mixer beside attention (hybrid blocks): its state
            # after the prefix is not in the cache (only its state after the whole prompt),
            # so restorations recompute every position rather than drop it (issue 26).
            log.debug("KV cache not reusable (layer %s carries a mixer state)", type(layer).__name__)
            return None
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.dim() != 4 or keys.shape[-2] != seq_len:
            log.debug(
                "KV cache not reusable (layer keeps %s of %d positions)",
                None if keys is None else keys.shape,
                seq_len,
            )
            return None
        kv.append((keys, values))
    return kv
