"""Per-fact results on disk, keyed by content: an interrupted run resumes, a param change
recomputes only what it touches.

The key (:func:`locedit.versioning.content_key`) covers everything the numbers depend on
(model fingerprint, the fact's text, the method, kind, window, noise level, sample count and
seed; for symmetric token replacement the drawn subjects instead of the noise level) and the code version of the module that computes them, never the path taken (fast and
reference give the same numbers) nor the flag threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from locedit.data.records import FactRecord
from locedit.tracing.replacement import STR_METHOD, load_str_result
from locedit.tracing.results import Result, load_result, save_result
from locedit.versioning import content_key

#: The modules whose code computes each cached value (their imports are versioned with them).
TRACING_MODULES = ("locedit.tracing.causal_trace",)
STR_MODULES = ("locedit.tracing.causal_trace", "locedit.tracing.replacement")
ZEROING_MODULES = ("locedit.tracing.zeroing",)

#: Bump when the numbers a cached result holds would change for the same inputs.
ALGORITHM_VERSION = 1


def fact_content(fact: FactRecord) -> dict:
    """The parts of a fact that tracing reads."""
    return {
        "fact_id": fact.fact_id,
        "subject": fact.subject,
        "prompt": fact.prompt,
        "target_true": fact.target_true,
    }


def tracing_key(
    fingerprint: str,
    fact: FactRecord,
    kind: str,
    window: int,
    n_samples: int,
    sigma: float,
    seed: int,
) -> str:
    return content_key(
        "tracing",
        model=fingerprint,
        record=fact_content(fact),
        params={
            "algorithm": ALGORITHM_VERSION,
            "kind": kind,
            "window": int(window),
            "n_samples": int(n_samples),
            "sigma": float(sigma),
            "seed": int(seed),
        },
        code=TRACING_MODULES,
    )


def str_tracing_key(
    fingerprint: str,
    fact: FactRecord,
    kind: str,
    window: int,
    replacements: tuple[str, ...],
    seed: int,
) -> str:
    """Key of an STR trace (Zhang & Nanda 2024): the draw itself (one replacement subject per
    sample, in order) stands in for the noise level, so STR and Gaussian results never share
    a key and a changed pool or seed recomputes exactly the facts whose draw changed."""
    return content_key(
        "tracing_str",
        model=fingerprint,
        record=fact_content(fact),
        params={
            "algorithm": ALGORITHM_VERSION,
            "corruption": "str",
            "kind": kind,
            "window": int(window),
            "n_samples": len(replacements),
            "replacements": list(replacements),
            "seed": int(seed),
        },
        code=STR_MODULES,
    )


def zeroing_key(fingerprint: str, fact: FactRecord, kind: str, window: int) -> str:
    return content_key(
        "zeroing",
        model=fingerprint,
        record=fact_content(fact),
        params={"algorithm": ALGORITHM_VERSION, "kind": kind, "window": int(window)},
        code=ZEROING_MODULES,
    )


class ResultCache:
    """A folder of ``<key>.npz`` files, written atomically."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str, min_denominator: float) -> Result | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return _load(path, min_denominator)
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # unreadable entry: recompute it
            return None

    def put(self, key: str, result: Result) -> None:
        save_result(self.path(key), result)


def _load(path: Path, min_denominator: float) -> Result:
    """A stored result of any method (STR results live in their own module)."""
    with np.load(path, allow_pickle=False) as data:
        method = json.loads(str(data["meta"]))["method"]
    if method == STR_METHOD:
        return load_str_result(path, min_denominator)
    return load_result(path, min_denominator)
