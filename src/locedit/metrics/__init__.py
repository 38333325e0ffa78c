"""Edit-success metrics (paper Sec. 3.4, App. C) and the probes they are computed from."""

from locedit.metrics.scores import (
    essence_score,
    neighborhood_score,
    overall_score,
    paraphrase_score,
    rewrite_score,
    rome_magnitude,
)

__all__ = [
    "essence_score",
    "neighborhood_score",
    "overall_score",
    "paraphrase_score",
    "rewrite_score",
    "rome_magnitude",
]
