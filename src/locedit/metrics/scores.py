"""The paper's edit-success metrics (Sec. 3.4, App. C) as pure functions of probabilities."""

from __future__ import annotations

import math
from collections.abc import Sequence

from locedit.data.records import Direction


def rewrite_score(p_pre: float, p_post: float, direction: Direction = "maximize") -> float:
    """Share of the possible change achieved (Sec. 3.4).

    Maximising problems: (p* - p) / (1 - p). Fact Erasure (minimise): (p - p*) / p.
    """
    if direction == "maximize":
        room = 1.0 - p_pre
        return (p_post - p_pre) / room if room > 0 else math.nan
    if direction == "minimize":
        return (p_pre - p_post) / p_pre if p_pre > 0 else math.nan
    raise ValueError(f"direction must be maximize or minimize, not {direction!r}")


def paraphrase_score(
    p_pre: Sequence[float], p_post: Sequence[float], direction: Direction = "maximize"
) -> float:
    """Rewrite score on each paraphrase prompt r*, averaged over all of them (Sec. 3.4)."""
    return _mean([rewrite_score(a, b, direction) for a, b in zip(p_pre, p_post, strict=True)])


def neighborhood_score(p_pre: Sequence[float], p_post: Sequence[float]) -> float:
    """1 - |p*(o|s*,r) - p(o|s*,r)| / (0.5 + |p(o|s*,r) - 0.5|), averaged over neighbours.

    The denominator is the largest change possible from p, so 0 means the neighbour's
    probability moved as far as it could and 1 means it did not move.
    """
    return _mean(
        [1.0 - abs(b - a) / (0.5 + abs(a - 0.5)) for a, b in zip(p_pre, p_post, strict=True)]
    )


def essence_score(ppl_before: float, ppl_after: float, cap: float = 5.0) -> float:
    """1 - clip(ppl_after - ppl_before, 0, cap) / cap (App. C)."""
    return 1.0 - min(max(ppl_after - ppl_before, 0.0), cap) / cap


def overall_score(*scores: float) -> float:
    """Plain mean of the given scores (rewrite, paraphrase, neighbourhood[, essence])."""
    return _mean(list(scores))


def rome_magnitude(p_new: float, p_true: float) -> float:
    """ROME's unscaled magnitude p(o_false) - p(o_true) (App. C, Fig. 14)."""
    return p_new - p_true


def _mean(values: list[float]) -> float:
    """Mean of the finite values; NaN when there are none (e.g. a record without paraphrases)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
