"""Bootstrap confidence intervals for R² and added R², resampling facts (beyond the paper).

The rows of one fact (its layers) are not independent draws: they share the fact's subject,
prompt and tracing curve. So a bootstrap sample draws *facts* with replacement and keeps all
rows of each drawn fact together. A fact drawn k times enters with weight k, which is exactly
the same least-squares problem as stacking its rows k times (``resample_facts`` builds that
stacked form; :func:`bootstrap_draws` sums per-fact normal equations weighted by those counts,
all samples in one batch).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from locedit.analysis.regression import Design

#: The statistics whose intervals are reported, computed per bootstrap sample.
BOOTSTRAP_STATS = ("r2_layer", "r2_trace", "r2_both", "added_r2")


def draw_facts(n_facts: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the facts in one bootstrap sample (n_facts draws with replacement)."""
    return rng.integers(0, n_facts, size=n_facts)


def fact_counts(n_facts: int, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each fact is drawn in each of ``n_samples`` bootstrap samples (samples x facts)."""
    return np.stack(
        [np.bincount(draw_facts(n_facts, rng), minlength=n_facts) for _ in range(n_samples)]
    ).astype(float)


def resample_facts(fact_ids: np.ndarray | pd.Series, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one bootstrap sample: facts drawn with replacement, each with all its rows.

    Facts are numbered in order of first appearance; :func:`bootstrap_draws` with the same
    generator state draws the same facts.
    """
    codes, uniques = pd.factorize(np.asarray(fact_ids))
    drawn = draw_facts(len(uniques), rng)
    rows_of = [np.flatnonzero(codes == k) for k in range(len(uniques))]
    return np.concatenate([rows_of[k] for k in drawn]) if len(drawn) else np.array([], dtype=int)


def _fact_moments(x: np.ndarray, y: np.ndarray, codes: np.ndarray, n_facts: int):
    """Per-fact sufficient statistics of least squares: X'X, X'y, y'y, sum y, row count."""
    onehot = np.zeros((len(codes), n_facts))
    onehot[np.arange(len(codes)), codes] = 1.0
    xtx = np.einsum("rf,ri,rj->fij", onehot, x, x)
    xty = np.einsum("rf,ri,r->fi", onehot, x, y)
    return xtx, xty, onehot.T @ (y * y), onehot.T @ y, onehot.sum(axis=0)


def _r2_from_moments(moments, counts: np.ndarray) -> np.ndarray:
    """R² of each bootstrap sample (rows of ``counts`` = times each fact was drawn), in one batch.

    Summing per-fact X'X and X'y weighted by the draw counts gives the normal equations of the
    stacked sample; the pseudo-inverse handles designs that lose rank in a sample (a layer or
    trace variation that no drawn fact has).
    """
    xtx, xty, yty, ysum, nrows = moments
    a = np.einsum("bf,fij->bij", counts, xtx)
    b = np.einsum("bf,fi->bi", counts, xty)
    n = counts @ nrows
    beta = np.einsum("bij,bj->bi", np.linalg.pinv(a, rcond=1e-10, hermitian=True), b)
    ssr = counts @ yty - np.einsum("bi,bi->b", beta, b)
    tss = counts @ yty - (counts @ ysum) ** 2 / n
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ssr / tss
    r2[tss <= 1e-12 * n] = np.nan
    return r2


def bootstrap_draws(
    df: pd.DataFrame,
    score: str,
    n_samples: int,
    seed: int = 0,
    trace: str = "trace",
    design: Design | None = None,
) -> np.ndarray:
    """R² of Layer, Trace, Both and added R² in each of ``n_samples`` fact resamples (rows x 4).

    Facts are numbered in order of first appearance among the rows of
    ``regression_frame(df, score)``. Empty when fewer than two facts have a usable score.
    """
    if n_samples <= 0 or score not in df.columns:
        return np.empty((0, len(BOOTSTRAP_STATS)))
    rows = (design or Design.build(df, trace)).select(score)
    mats = rows.exog
    codes, uniques = pd.factorize(rows.fact)
    if len(uniques) < 2:
        return np.empty((0, len(BOOTSTRAP_STATS)))
    y = rows.score
    y = (
        y - y.mean()
    )  # R² is unchanged by a shift of y (every model has an intercept); less cancellation
    rng = np.random.default_rng(seed)
    n_facts = len(uniques)
    counts = fact_counts(n_facts, n_samples, rng)
    r2 = {
        name: _r2_from_moments(_fact_moments(x, y, codes, n_facts), counts)
        for name, x in mats.items()
    }
    return np.column_stack([r2["layer"], r2["trace"], r2["both"], r2["both"] - r2["layer"]])


def bootstrap_r2(
    df: pd.DataFrame,
    score: str,
    n_samples: int,
    seed: int = 0,
    ci_level: float = 0.95,
    trace: str = "trace",
    design: Design | None = None,
) -> dict[str, float]:
    """Percentile intervals ``<stat>_lo``/``<stat>_hi`` for R² of Layer, Trace, Both and added R².

    Samples where a statistic is undefined (e.g. a constant score) are left out of its interval;
    ``bootstrap_valid`` says how many samples the added-R² interval rests on.
    """
    out: dict[str, float] = {f"{s}_{b}": math.nan for s in BOOTSTRAP_STATS for b in ("lo", "hi")}
    out["bootstrap_samples"] = n_samples
    draws = bootstrap_draws(df, score, n_samples, seed, trace, design)
    out["bootstrap_valid"] = int(np.isfinite(draws[:, -1]).sum()) if len(draws) else 0
    alpha = (1.0 - ci_level) / 2.0
    for j, stat in enumerate(BOOTSTRAP_STATS):
        col = draws[:, j] if len(draws) else draws[:0, 0]
        col = col[np.isfinite(col)]
        if len(col):
            out[f"{stat}_lo"] = float(np.quantile(col, alpha))
            out[f"{stat}_hi"] = float(np.quantile(col, 1.0 - alpha))
    return out
