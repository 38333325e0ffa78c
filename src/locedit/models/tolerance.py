"""The one tolerance for "the same numbers": fast path vs reference, spec checks, the zoo.

``|got - ref| <= ABS * max|ref| + REL * |ref|`` elementwise. Both terms scale with the compared
values: an absolute bound (1e-4, or 1e-5 plus the values' scale + 1) lets a 1.4% error pass
when p(o) is about 1e-5, as it is in random and small models with a 50k vocabulary (issue 26).
``ABS`` is relative to the largest magnitude compared, so entries near zero in a tensor whose
scale is 1 do not demand more than float rounding gives.
"""

from __future__ import annotations

import numpy as np
import torch

REL = 1e-4
ABS = 1e-5


def _as_float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().double().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def max_excess(got, ref, rel: float = REL, abs_: float = ABS) -> float:
    """How far the worst element of ``got`` lies outside the tolerance around ``ref`` (0 when
    all are inside; inf on a shape mismatch or a NaN)."""
    got, ref = _as_float64(got), _as_float64(ref)
    if got.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    bound = abs_ * float(np.abs(ref).max()) + rel * np.abs(ref)
    excess = np.abs(got - ref) - bound
    if np.isnan(excess).any():
        return float("inf")
    return max(0.0, float(excess.max()))


def within(got, ref, rel: float = REL, abs_: float = ABS) -> bool:
    """Whether ``got`` equals ``ref`` to the relative tolerance (see the module docstring)."""
    return max_excess(got, ref, rel, abs_) == 0.0
