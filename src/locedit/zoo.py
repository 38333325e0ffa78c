"""The model zoo: every causal-LM class transformers ships, built tiny and random, either traced
and edited exactly or refused in one line (``scripts/model_zoo.py``, ``make zoo``).

One family's check (:func:`check_family`) runs discovery and the load-time validation, traces
one fact for ``mlp``, ``attn`` and ``resid`` with the fast and the reference path (Causal
Tracing, paper §3.2), compares zeroing (App. B) with one plain forward per window, and edits
with every registered method at the first and the last layer, checking the weights bit-exact
after each edit (one of them raised inside the ``edited`` block). Everything it compares is
held to :func:`locedit.models.tolerance.within` (relative), so small probabilities count as
much as large ones.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from locedit.data.records import FactRecord
from locedit.models.architecture import UnsupportedArchitectureError, n_layers
from locedit.models.discovery import prepare_architecture, refuse_unsupported_structure
from locedit.models.tolerance import max_excess

#: Outcomes: ``pass`` (everything exact), ``refused`` (one line: what is unsupported),
#: ``unbuilt`` (no tiny random model can be built offline from the config alone: why),
#: ``fail`` (a crash or a mismatch: a bug of locedit or of the zoo).
STATUSES = ("pass", "refused", "unbuilt", "fail")
FACT = FactRecord("zoo", "Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French")
REQUEST_PROMPT = "The Eiffel Tower is located in the city of"
#: Cheap settings: the zoo checks that every method runs and restores, not edit quality.
EDIT_OVERRIDES = {
    "closed_form": {"n_context_templates": 1, "context_template_lengths": (3,), "v_steps": 2},
    "finetune": {"steps": 2},
}
#: Parameters above this are not "tiny" (a config whose sizes do not follow hidden_size).
MAX_PARAMS = 30_000_000


@dataclass
class Outcome:
    """One family's row of ``docs/models.md``."""

    family: str
    model_class: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class ZooMismatch(AssertionError):
    """A fast path, zeroing or restoration that does not match its reference."""


class _Unbuilt(RuntimeError):
    """No tiny model of the family can be built offline."""


class _RaisedInside(RuntimeError):
    """Raised inside an ``edited`` block to check the restoration on the error path."""


def causal_lm_families() -> dict[str, str]:
    """transformers' causal-LM auto mapping: model_type -> class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (
        f"{type(err).__name__}: {text}"
        if not isinstance(err, UnsupportedArchitectureError)
        else text
    )


def build_tiny(family: str, n_layers_: int = 2) -> nn.Module:
    """A tiny random model of ``family`` (2 layers, width 64, GPT-2's vocabulary), float32,
    that runs a plain forward pass; :class:`_Unbuilt` says why there is none."""
    from transformers import AutoModelForCausalLM

    from locedit.testing import tiny_config, tiny_model

    try:
        config = tiny_config(family, n_layers=n_layers_)
        with torch.device("meta"):  # the size first: some configs ignore the tiny settings
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception as err:  # noqa: BLE001 - any config or init error means "cannot build"
        raise _Unbuilt(f"no tiny model from the config alone ({one_line(err)[:200]})") from err
    if size > MAX_PARAMS:
        raise _Unbuilt(f"the config ignores the tiny sizes (still {size / 1e6:.0f}M parameters)")
    model = tiny_model(family, n_layers=n_layers_).float()
    refuse_unsupported_structure(model)  # before running it: out of scope whether it runs or not
    try:
        with torch.no_grad():
            model(input_ids=_probe_ids(model), use_cache=False)
    except Exception as err:  # noqa: BLE001 - the model's own code fails on its tiny config
        raise _Unbuilt(
            f"the tiny model does not run a plain forward ({one_line(err)[:200]})"
        ) from err
    return model


def _probe_ids(model: nn.Module) -> torch.Tensor:
    from locedit.models.device import model_device

    return torch.tensor([[464, 3139, 286, 4881]], device=model_device(model))


def _check_cached_forward(model: nn.Module) -> None:
    """Tracing runs the model with a KV cache; a tiny model whose own code cannot (e.g. a
    2-layer Qwen3.5 left with linear-attention layers only) is unbuilt, not locedit's failure."""
    try:
        with torch.no_grad():
            model(input_ids=_probe_ids(model), use_cache=True)
    except Exception as err:  # noqa: BLE001
        raise _Unbuilt(
            f"the tiny model does not run a forward with a KV cache ({one_line(err)[:200]})"
        ) from err


def trace_fact_many_for_zoo(*args, **kwargs):
    """The fast path under test (one name, so a test can show that a mismatch fails)."""
    from locedit.tracing import trace_fact_many

    return trace_fact_many(*args, **kwargs)


def check_tracing(model: nn.Module, tokenizer) -> None:
    """Fast tracing equals the reference for every kind; zeroing equals plain forwards."""
    from locedit.tracing import trace_fact_reference, zero_fact

    args = {"sigma": 0.5, "seed": 3, "n_samples": 2}
    kinds = ("mlp", "attn", "resid")
    window = 2
    fast = trace_fact_many_for_zoo(model, tokenizer, FACT, kinds=kinds, windows=(window,), **args)
    for result, kind in zip(fast, kinds, strict=True):
        ref = trace_fact_reference(model, tokenizer, FACT, kind=kind, window=window, **args)
        for name in ("p_clean", "p_noised", "p_restored"):
            excess = max_excess(getattr(result, name), getattr(ref, name))
            if excess > 0:
                raise ZooMismatch(
                    f"fast tracing differs from the reference ({kind} {name}, "
                    f"{excess:.3g} over the tolerance)"
                )
        if not np.all(np.isfinite(ref.p_restored)):
            raise ZooMismatch(f"tracing ({kind}) gives non-finite probabilities")
    zeroed = zero_fact(model, tokenizer, FACT, kind="mlp", window=window)
    by_hand = np.array(
        [_zeroed_forward(model, tokenizer, layer, window) for layer in range(n_layers(model))]
    )
    excess = max_excess(zeroed.p_zeroed, by_hand)
    if excess > 0:
        raise ZooMismatch(f"batched zeroing differs from plain forwards ({excess:.3g} over)")


def _zeroed_forward(model: nn.Module, tokenizer, layer: int, window: int) -> float:
    """p(o_true) of one plain forward with the subject's MLP outputs zeroed in the window."""
    from locedit.models.hooks import window_layers
    from locedit.tracing.patching import encode_fact, patched_target_probs, set_positions

    inp = encode_fact(tokenizer, FACT)
    subject = list(range(inp.subject_start, inp.subject_end))
    patches = {
        j: set_positions(slice(None), subject, 0.0)
        for j in window_layers(layer, window, n_layers(model))
    }
    return float(patched_target_probs(model, inp, None, "mlp", patches)[0])


def check_edits(model: nn.Module, tokenizer, store, methods: tuple[str, ...] | None = None) -> int:
    """Every method at the first and last layer; weights bit-exact after each. Returns count."""
    from locedit.editing import ALL_METHODS, EditRequest, edited, get_method, hparams_for

    request = EditRequest(REQUEST_PROMPT, "Eiffel Tower", "Rome")
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    last = n_layers(model) - 1
    done = 0
    for method in ALL_METHODS if methods is None else methods:
        kind = "closed_form" if get_method(method).needs_key_stats else "finetune"
        hp = hparams_for(method, overrides=EDIT_OVERRIDES[kind])
        for layer in (0, last):
            raise_inside = method == "rome" and layer == last
            try:
                with edited(model, tokenizer, method, request, layer, hp, store) as result:
                    changed = {
                        n for n, p in model.named_parameters() if not torch.equal(p, originals[n])
                    }
                    if not changed or not changed <= set(result.changed):
                        raise ZooMismatch(
                            f"{method} at layer {layer} changed {sorted(changed)[:3]}, "
                            f"reported {result.changed[:3]}"
                        )
                    if raise_inside:
                        raise _RaisedInside
            except _RaisedInside:
                pass
            moved = [n for n, p in model.named_parameters() if not torch.equal(p, originals[n])]
            if moved:
                raise ZooMismatch(f"{method} at layer {layer} left {moved[:3]} edited")
            done += 1
    return done


def check_family(
    family: str,
    tokenizer,
    store_factory: Callable[[], object],
    *,
    model_class: str = "",
    methods: tuple[str, ...] | None = None,
    build: Callable[[], nn.Module] | None = None,
) -> Outcome:
    """Build (``build`` or :func:`build_tiny`), discover, validate, trace and edit one family;
    never raises."""
    start = time.perf_counter()
    outcome = Outcome(family, model_class, "pass")
    try:
        model = build() if build is not None else build_tiny(family)
        outcome.model_class = type(model).__name__
        try:
            prepare_architecture(model)
        except UnsupportedArchitectureError:
            raise
        except Exception:
            _check_cached_forward(model)  # unbuilt if the model's own cached forward fails
            raise
        check_tracing(model, tokenizer)
        edits = check_edits(model, tokenizer, store_factory(), methods)
        outcome.reason = f"traced exactly; {edits} edits restored bit-exact"
    except _Unbuilt as err:
        outcome.status, outcome.reason = "unbuilt", str(err)
    except UnsupportedArchitectureError as err:
        outcome.status, outcome.reason = "refused", one_line(err)
    except Exception as err:  # noqa: BLE001 - the zoo records every crash as a failure
        outcome.status, outcome.reason = "fail", one_line(err)[:300]
        outcome.detail = traceback.format_exc()
    outcome.seconds = round(time.perf_counter() - start, 1)
    return outcome


def covariance_store(folder: Path, tokenizer):
    """A small key-statistics store (the tests' size) for the closed-form editors, read from
    this module's own text (always present; sampling from each model costs more than the
    edits)."""
    from locedit.editing import CorpusSpec, CovarianceStore

    spec = CorpusSpec(kind="text_file", text_file=__file__, n_samples=16, sample_length=24)
    return CovarianceStore(folder, spec, tokenizer)
