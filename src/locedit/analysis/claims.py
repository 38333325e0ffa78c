"""How reports/summary.md may word a result: a difference from the paper only where an interval
excludes the paper's value, and small samples named as such in the sentence (issue 27.6)."""

from __future__ import annotations

import math

#: ROME's R² of rewrite score from the edit layer alone, GPT-J, CounterFact (paper Table 1).
PAPER_ROME_LAYER_R2 = 0.947
#: The largest R² the tracing effect adds to the layer in any condition (paper Table 3: FT-5,
#: Fact Forcing, 0.032); "tracing adds little" is the paper's finding.
PAPER_MAX_ADDED_R2 = 0.032
#: Fewer facts than this make a small sample: a bootstrap over so few facts gives rough, wide
#: intervals, and the summary says so wherever it reports such a result.
SMALL_SAMPLE_FACTS = 30
#: Added R² is never negative and grows with the interaction terms' overfit when facts are few,
#: so its bootstrap interval can lie above a small value with no effect at all: "tracing adds
#: more than in the paper" also needs the F-test (paper footnote 2) to reject "adds nothing".
ALPHA = 0.05


def pct(value: float) -> str:
    return f"{100 * value:.1f}%" if math.isfinite(value) else "n/a"


def finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(float(value))


def interval(lo, hi, level: float) -> str:
    """``95% CI 1.0% to 4.0%``, or that there is none (bootstrap off or too few facts)."""
    if not (finite(lo) and finite(hi)):
        return "no interval"
    return f"{level:.0%} CI {pct(lo)} to {pct(hi)}"


def sample(n: int, n_facts: int) -> str:
    """``n = 20 edits of 5 facts, a small sample`` (the last part below SMALL_SAMPLE_FACTS)."""
    small = ", a small sample" if n_facts < SMALL_SAMPLE_FACTS else ""
    return f"n = {n} edits of {n_facts} fact{'s' if n_facts != 1 else ''}{small}"


def versus_paper(lo, hi, paper: float, what: str) -> str:
    """How a value with interval [lo, hi] compares with the paper's: a difference is stated
    only when the interval excludes the paper's value."""
    if not (finite(lo) and finite(hi)):
        return f"without an interval no difference from the paper's {what} ({pct(paper)}) can be stated"
    if lo > paper:
        return f"above the paper's {what} ({pct(paper)}): the interval excludes it"
    if hi < paper:
        return f"below the paper's {what} ({pct(paper)}): the interval excludes it"
    return f"the interval includes the paper's {what} ({pct(paper)}): no difference shown"


def adds_more_than_paper(lo, hi, f_pvalue) -> bool:
    """Tracing adds more than the paper's largest added R²: the interval lies above it and the
    F-test rejects that tracing adds nothing (:data:`ALPHA`)."""
    return (
        finite(lo) and finite(hi) and lo > PAPER_MAX_ADDED_R2
        and finite(f_pvalue) and f_pvalue < ALPHA
    )


def added_versus_paper(lo, hi, f_pvalue) -> str:
    """The added R² against the paper's largest, in words (see :func:`adds_more_than_paper`)."""
    if adds_more_than_paper(lo, hi, f_pvalue):
        return f"above the paper's largest added R² ({pct(PAPER_MAX_ADDED_R2)}): the interval excludes it"
    if finite(lo) and lo > PAPER_MAX_ADDED_R2:
        return (
            f"the interval lies above the paper's largest added R² ({pct(PAPER_MAX_ADDED_R2)}) but the "
            f"F-test does not reject that tracing adds nothing, so no difference is claimed"
        )
    return versus_paper(lo, hi, PAPER_MAX_ADDED_R2, "largest added R²")
