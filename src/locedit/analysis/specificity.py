"""The neighbourhood score beside CounterFact+'s neighbourhood KL, as means over edits.

The neighbourhood score (paper Sec. 3.4) is higher-is-better; the neighbourhood KL
(Hoelscher-Obermaier et al., Findings of ACL 2023; :mod:`locedit.metrics.neighborhood_kl`) is
lower-is-better and unbounded, so it is reported as means here and kept out of the R²
regressions over ``analysis.metrics`` (whose floors and readings assume scores).
"""

from __future__ import annotations

import math

import pandas as pd

#: The two specificity columns, reported side by side.
SPECIFICITY_COLUMNS = ("neighborhood_score", "neighborhood_kl")
KL_COLUMN = "neighborhood_kl"


def has_neighborhood_kl(results: pd.DataFrame) -> bool:
    """Whether any edit carries a finite neighbourhood KL (the option was on)."""
    if KL_COLUMN not in results:
        return False
    values = pd.to_numeric(results[KL_COLUMN], errors="coerce")
    return bool(values.map(math.isfinite).any())


def specificity_means(
    results: pd.DataFrame, dataset: str | None, by_layer: bool = True
) -> pd.DataFrame:
    """Mean neighbourhood score and KL of the successful edits with a KL, per problem, method
    (and layer); empty when no edit has a KL."""
    keys = ["problem", "method", *(["layer"] if by_layer else [])]
    columns = [*keys, "n", *SPECIFICITY_COLUMNS]
    if results.empty or not has_neighborhood_kl(results):
        return pd.DataFrame(columns=columns)
    ok = results[results["status"].astype(str) == "ok"].copy()
    if dataset is not None and "dataset" in ok:
        ok = ok[ok["dataset"] == dataset]
    ok[KL_COLUMN] = pd.to_numeric(ok[KL_COLUMN], errors="coerce")
    ok = ok[ok[KL_COLUMN].map(math.isfinite)]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    means = (
        ok.groupby(keys, sort=True)
        .agg(
            n=(KL_COLUMN, "size"),
            neighborhood_score=("neighborhood_score", "mean"),
            neighborhood_kl=(KL_COLUMN, "mean"),
        )
        .reset_index()
    )
    return means[columns]
