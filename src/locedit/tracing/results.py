"""Per-fact results of Causal Tracing and representation zeroing, and the tidy table rows.

Effects are computed from stored probabilities on demand, so the flag threshold
(``min_denominator``) can change without recomputing anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _fraction(numerator: np.ndarray | float, denominator: float) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is exactly zero (never inf)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    if denominator == 0.0:
        return np.full_like(numerator, np.nan)
    return numerator / denominator


@dataclass
class FactLocalization:
    """What tracing and zeroing results of one fact share: the fact, the component kind and
    window, the prompt's tokens with the subject span, and p(o_true | s, r)."""

    fact_id: str
    kind: str
    window: int
    tokens: tuple[str, ...]
    subject_start: int
    subject_end: int
    p_clean: float


@dataclass
class TraceResult(FactLocalization):
    """Causal Tracing of one fact for one component kind and window size (paper §3.2, §4.1).

    ``p_restored[t, l]`` is p(o_true | s_noise, r, clean ``kind`` outputs at token t for the
    window of layers centred on l), averaged over the noise samples as ROME does; ``p_noised``
    is the same average without restoration.
    """

    p_noised: float
    p_restored: np.ndarray
    n_samples: int
    sigma: float
    min_denominator: float = 0.01
    method: str = field(default="tracing", init=False)

    @property
    def n_layers(self) -> int:
        return int(self.p_restored.shape[1])

    @property
    def denominator(self) -> float:
        return float(self.p_clean - self.p_noised)

    @property
    def low_denominator(self) -> bool:
        """p_clean - p_noised is too small for the fractional effect to mean anything."""
        return self.denominator < self.min_denominator

    @property
    def effect(self) -> np.ndarray:
        """Fractional tracing effect per (token, layer): 0 = no effect, 1 = fully restored."""
        return _fraction(self.p_restored - self.p_noised, self.denominator)

    @property
    def effect_max(self) -> np.ndarray:
        """Per layer, the max over tokens (the paper's default tracing effect)."""
        return self.effect.max(axis=0)

    @property
    def argmax_token(self) -> np.ndarray:
        """Per layer, the token whose restoration gave the max effect."""
        effect = self.effect
        if np.isnan(effect).all():
            return np.full(self.n_layers, -1)
        return np.argmax(effect, axis=0)

    @property
    def effect_last_subject(self) -> np.ndarray:
        """Per layer, the effect at the last subject token (paper App. C, Fig. 16)."""
        return self.effect[self.subject_end - 1]

    def rows(self) -> list[dict]:
        """One tidy-table row per layer."""
        return _layer_rows(
            self, self.effect_max, self.effect_last_subject, self.argmax_token, self.p_noised
        )

    def meta(self) -> dict:
        return {
            **_common_meta(self),
            "p_noised": self.p_noised,
            "n_samples": self.n_samples,
            "sigma": self.sigma,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {"p_restored": self.p_restored}

    @classmethod
    def from_stored(
        cls, meta: dict, arrays: dict[str, np.ndarray], min_denominator: float
    ) -> TraceResult:
        return cls(
            **_common_fields(meta),
            p_noised=float(meta["p_noised"]),
            p_restored=np.asarray(arrays["p_restored"], dtype=np.float64),
            n_samples=int(meta["n_samples"]),
            sigma=float(meta["sigma"]),
            min_denominator=min_denominator,
        )


@dataclass
class ZeroingResult(FactLocalization):
    """Representation zeroing of one fact (paper App. B).

    ``p_zeroed[l]``: p(o_true | s, r) with the ``kind`` outputs at *all* subject tokens set to
    zero for the window of layers centred on l (the paper's definition);
    ``p_zeroed_last[l]``: the same with only the last subject token zeroed.
    """

    p_zeroed: np.ndarray
    p_zeroed_last: np.ndarray
    min_denominator: float = 0.01
    method: str = field(default="zeroing", init=False)

    @property
    def n_layers(self) -> int:
        return int(self.p_zeroed.shape[0])

    @property
    def low_denominator(self) -> bool:
        return self.p_clean < self.min_denominator

    @property
    def effect(self) -> np.ndarray:
        """Fraction of p_clean deleted by zeroing the subject tokens (0 none, 1 all)."""
        return _fraction(self.p_clean - self.p_zeroed, self.p_clean)

    @property
    def effect_last_subject(self) -> np.ndarray:
        return _fraction(self.p_clean - self.p_zeroed_last, self.p_clean)

    def rows(self) -> list[dict]:
        """Tidy rows; ``effect_max`` holds the paper's all-subject-token effect (no token max)."""
        no_token = np.full(self.n_layers, -1)
        return _layer_rows(self, self.effect, self.effect_last_subject, no_token, float("nan"))

    def meta(self) -> dict:
        return _common_meta(self)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"p_zeroed": self.p_zeroed, "p_zeroed_last": self.p_zeroed_last}

    @classmethod
    def from_stored(
        cls, meta: dict, arrays: dict[str, np.ndarray], min_denominator: float
    ) -> ZeroingResult:
        return cls(
            **_common_fields(meta),
            p_zeroed=np.asarray(arrays["p_zeroed"], dtype=np.float64),
            p_zeroed_last=np.asarray(arrays["p_zeroed_last"], dtype=np.float64),
            min_denominator=min_denominator,
        )


Result = TraceResult | ZeroingResult


def save_result(path: Path, result: Result) -> None:
    """Write one result as .npz atomically (a killed run never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(result.meta())), **result.arrays())
    tmp.replace(path)


def load_result(path: Path, min_denominator: float) -> Result:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        arrays = {k: data[k] for k in data.files if k != "meta"}
    cls = TraceResult if meta["method"] == "tracing" else ZeroingResult
    return cls.from_stored(meta, arrays, min_denominator)


def _layer_rows(
    result: TraceResult | ZeroingResult,
    effect_max: np.ndarray,
    effect_last_subject: np.ndarray,
    argmax_token: np.ndarray,
    p_noised: float,
) -> list[dict]:
    """The tidy per-layer rows tracing and zeroing share (one schema for the analysis)."""
    return [
        {
            "fact_id": result.fact_id,
            "method": result.method,
            "kind": result.kind,
            "window": result.window,
            "layer": layer,
            "effect_max": float(effect_max[layer]),
            "effect_last_subject": float(effect_last_subject[layer]),
            "argmax_token": int(argmax_token[layer]),
            "p_clean": result.p_clean,
            "p_noised": p_noised,
            "low_denominator": result.low_denominator,
        }
        for layer in range(result.n_layers)
    ]


def _common_meta(result: TraceResult | ZeroingResult) -> dict:
    return {
        "method": result.method,
        "fact_id": result.fact_id,
        "kind": result.kind,
        "window": result.window,
        "tokens": list(result.tokens),
        "subject_start": result.subject_start,
        "subject_end": result.subject_end,
        "p_clean": result.p_clean,
    }


def _common_fields(meta: dict) -> dict:
    """Constructor fields stored by :func:`_common_meta`."""
    return {
        "fact_id": meta["fact_id"],
        "kind": meta["kind"],
        "window": int(meta["window"]),
        "tokens": tuple(meta["tokens"]),
        "subject_start": int(meta["subject_start"]),
        "subject_end": int(meta["subject_end"]),
        "p_clean": float(meta["p_clean"]),
    }
