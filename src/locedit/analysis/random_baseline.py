"""Does tracing pick better edit layers than chance? The random-location baseline (beyond the paper).

Hase et al. (2023) ask whether the layer where Causal Tracing localizes a fact predicts where
editing it succeeds, by regression (Secs. 4-5). Wang & Veitch (2025, arXiv 2502.11447) ask it
from the other side: optimal edits at random locations can work as well as at "localised" ones.
This module compares, per method and problem, the edit success of each fact

(a) at the *tracing-chosen* layer: of the layers the sweep edited for the fact, the one where
    its tracing effect (``analysis.trace``) is largest, ties to the lowest layer;
(b) at the method's *default* layer: the edited layer nearest the originals' default edit layer
    scaled to the model's depth (:func:`locedit.default_layers.scaled_default_layer`), ties to
    the lower layer;
(c) at a *random* layer: uniform over the same edited layers. Its expectation is exact (the
    fact's mean score over its edited layers); ``draws`` seeded random assignments of one layer
    per fact give a Monte-Carlo check of it, the chance range of one random assignment, and a
    p-value: the share of assignments that do at least as well as tracing's choice.

The candidate layers of a fact are its rows in the main regression table (successful edits
with a finite tracing effect, low-denominator facts left out as configured), with a finite
score for the metric. Facts with fewer than two candidate layers are skipped and counted. With
the default grid (``edit.n_grid_layers``) the candidates are a few layers, so "tracing-chosen"
means the best-traced *edited* layer; with ``edit.layers`` covering every layer the comparison
is exact. Bootstrap intervals resample facts (:mod:`locedit.analysis.bootstrap`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from locedit.analysis.bootstrap import fact_counts
from locedit.analysis.claims import SMALL_SAMPLE_FACTS
from locedit.analysis.config import AnalysisConfig
from locedit.analysis.labels import (
    method_label,
    method_rank,
    metric_label,
    problem_label,
    problem_rank,
)
from locedit.default_layers import scaled_default_layer

#: Per-fact success under each choice of edit layer; ``diff`` = tracing-chosen minus random.
CHOICES = ("tracing", "default", "random", "diff", "diff_default")
#: Draws per block when scoring random assignments (bounds memory to block x facts floats).
DRAW_BLOCK = 256


@dataclass
class RandomBaseline:
    """One row per (dataset, method, problem, metric), and what was skipped."""

    frame: pd.DataFrame
    n_layers: int | None = None
    default_layer: int | None = None
    notes: list[str] = field(default_factory=list)


def model_depth(effects: pd.DataFrame, results: pd.DataFrame) -> int | None:
    """The model's number of layers, as traced: tracing restores every layer 0..L-1."""
    layers = [int(df["layer"].max()) for df in (effects, results) if len(df) and "layer" in df]
    return max(layers) + 1 if layers else None


def fact_choices(part: pd.DataFrame, metric: str, default_layer: int) -> tuple[pd.DataFrame, int]:
    """Per fact: its score at the tracing-chosen and the default edited layer, its mean score
    over its edited layers (the exact expectation of a random layer), and its candidate count.

    ``part``: one condition's rows with ``fact_id``, ``layer``, ``trace`` and ``metric``.
    Returns the table (sorted by fact_id) and the number of facts skipped for having fewer than
    two candidate layers.
    """
    rows = part.loc[np.isfinite(part[metric].astype(float)), ["fact_id", "layer", "trace", metric]]
    rows = rows.astype({metric: float, "trace": float, "layer": int})
    sizes = rows.groupby("fact_id")["layer"].size()
    keep = sizes.index[sizes >= 2]
    skipped = int((sizes < 2).sum())
    rows = rows[rows["fact_id"].isin(keep)]
    if rows.empty:
        columns = ["fact_id", "tracing_layer", "tracing", "default_layer", "default", "random", "k"]
        return pd.DataFrame(columns=columns), skipped
    peak = rows.sort_values(["fact_id", "trace", "layer"], ascending=[True, False, True])
    peak = peak.drop_duplicates("fact_id").set_index("fact_id")
    near = rows.assign(_d=(rows["layer"] - default_layer).abs())
    near = near.sort_values(["fact_id", "_d", "layer"]).drop_duplicates("fact_id")
    near = near.set_index("fact_id")
    grouped = rows.groupby("fact_id")[metric]
    out = pd.DataFrame(
        {
            "tracing_layer": peak["layer"],
            "tracing": peak[metric],
            "default_layer": near["layer"],
            "default": near[metric],
            "random": grouped.mean(),
            "k": grouped.size(),
        }
    ).sort_index()
    return out.rename_axis("fact_id").reset_index(), skipped


def score_matrix(part: pd.DataFrame, metric: str, facts: pd.Series) -> np.ndarray:
    """Facts x candidate layers (ascending), NaN-padded: the scores a random layer picks from."""
    rows = part[part["fact_id"].isin(set(facts)) & np.isfinite(part[metric].astype(float))]
    rows = rows.sort_values(["fact_id", "layer"])
    slot = rows.groupby("fact_id").cumcount()
    wide = rows.assign(_slot=slot).pivot(index="fact_id", columns="_slot", values=metric)
    return wide.reindex(list(facts)).to_numpy(dtype=float)


def random_assignments(scores: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Mean score over facts of ``draws`` assignments of one uniformly random layer per fact."""
    k = np.isfinite(scores).sum(axis=1)
    rows = np.arange(len(scores))
    out = np.empty(draws)
    for start in range(0, draws, DRAW_BLOCK):
        n = min(DRAW_BLOCK, draws - start)
        slot = (rng.random((n, len(scores))) * k).astype(int)
        out[start : start + n] = scores[rows, slot].mean(axis=1)
    return out


def bootstrap_means(values: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Column means of ``values`` (facts x statistics) in ``n_samples`` resamples of facts."""
    return fact_counts(len(values), n_samples, rng) @ values / len(values)


def condition_row(
    part: pd.DataFrame,
    metric: str,
    default_layer: int,
    draws: int,
    bootstrap_samples: int,
    ci_level: float,
    seeds: tuple[int, int],
) -> dict[str, float]:
    """The baseline statistics of one (method, problem, metric); see the module docstring."""
    per_fact, skipped = fact_choices(part, metric, default_layer)
    row: dict[str, float] = {"n_facts": len(per_fact), "n_skipped": skipped}
    nan = math.nan
    for name in CHOICES:
        row.update({name: nan, f"{name}_lo": nan, f"{name}_hi": nan})
    row.update(random_mc=nan, random_draw_lo=nan, random_draw_hi=nan, p_random=nan)
    row["layers_per_fact"] = float(per_fact["k"].mean()) if len(per_fact) else nan
    if per_fact.empty:
        return row
    values = np.column_stack(
        [
            per_fact["tracing"],
            per_fact["default"],
            per_fact["random"],
            per_fact["tracing"] - per_fact["random"],
            per_fact["tracing"] - per_fact["default"],
        ]
    ).astype(float)
    row.update(dict(zip(CHOICES, values.mean(axis=0).tolist(), strict=True)))
    alpha = (1.0 - ci_level) / 2.0
    if bootstrap_samples and len(per_fact) >= 2:
        means = bootstrap_means(values, bootstrap_samples, np.random.default_rng(seeds[1]))
        for j, name in enumerate(CHOICES):
            row[f"{name}_lo"] = float(np.quantile(means[:, j], alpha))
            row[f"{name}_hi"] = float(np.quantile(means[:, j], 1.0 - alpha))
    scores = score_matrix(part, metric, per_fact["fact_id"])
    assigned = random_assignments(scores, draws, np.random.default_rng(seeds[0]))
    at_least = int((assigned >= row["tracing"] - 1e-12).sum())
    row.update(
        random_mc=float(assigned.mean()),
        random_draw_lo=float(np.quantile(assigned, alpha)),
        random_draw_hi=float(np.quantile(assigned, 1.0 - alpha)),
        p_random=(1 + at_least) / (1 + draws),
    )
    return row


def peak_share(curves: pd.DataFrame, part: pd.DataFrame) -> float:
    """Share of the condition's facts whose tracing peak over *all* traced layers was edited."""
    finite = curves[np.isfinite(curves["trace"].astype(float))]
    facts = set(part["fact_id"])
    finite = finite[finite["fact_id"].isin(facts)]
    if finite.empty:
        return math.nan
    peaks = finite.sort_values(["fact_id", "trace", "layer"], ascending=[True, False, True])
    peaks = peaks.drop_duplicates("fact_id")[["fact_id", "layer"]]
    edited = part[["fact_id", "layer"]].drop_duplicates()
    hit = peaks.merge(edited, on=["fact_id", "layer"], how="left", indicator=True)
    return float((hit["_merge"] == "both").mean())


def random_baseline(
    joined: pd.DataFrame,
    curves: pd.DataFrame,
    cfg: AnalysisConfig,
    n_layers: int | None,
    seed_of: Callable[..., int],
    dataset: str | None = None,
) -> RandomBaseline:
    """Tracing-chosen vs. default vs. random edit layer for every (method, problem, metric).

    ``joined``: the main regression rows (successful edits with their tracing effect);
    ``curves``: the main tracing effect at every layer; ``seed_of(*key)`` a per-condition seed
    (:func:`locedit.analysis.study._seed` with the analysis seed), so a condition's draws do
    not depend on which other conditions exist.
    """
    spec = cfg.random_baseline
    metrics = list(spec.metrics or cfg.metrics)
    if dataset is not None and "dataset" in joined:
        joined = joined[joined["dataset"] == dataset]
    if joined.empty or n_layers is None:
        return RandomBaseline(pd.DataFrame(), n_layers, None, ["no edits joined with tracing"])
    default = scaled_default_layer(n_layers)
    rows = []
    for (method, problem), part in joined.groupby(["method", "problem"], sort=False):
        seeds = (
            seed_of("random_baseline", "draws", dataset, method, problem),
            seed_of("random_baseline", "bootstrap", dataset, method, problem),
        )
        share = peak_share(curves, part)
        for metric in metrics:
            if metric not in part:
                continue
            stats = condition_row(
                part, metric, default, spec.draws, cfg.bootstrap_samples, cfg.ci_level, seeds
            )
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "problem": problem,
                    "metric": metric,
                    "default_layer": default,
                    "peak_edited": share,
                    **stats,
                }
            )
    rows.sort(
        key=lambda r: (
            problem_rank(r["problem"]),
            method_rank(r["method"]),
            metrics.index(r["metric"]),
        )
    )
    frame = pd.DataFrame(rows)
    notes = []
    if not frame.empty:
        skipped = frame.groupby(["method", "problem"])["n_skipped"].max()
        if skipped.any():
            notes.append(
                f"{int(skipped.max())} facts (most in one method x problem) skipped for having "
                "fewer than two edited layers with a score and a tracing effect."
            )
    return RandomBaseline(frame, n_layers, default, notes)


#: Interval columns of the table: (label, low column, high column) of the display frame.
TABLE_INTERVALS = (
    ("Tracing-chosen", "tracing"),
    ("Default", "default"),
    ("Random", "random"),
    ("Random draws", "random_draw"),
    ("Tracing − random", "diff"),
    ("Tracing − default", "diff_default"),
)


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The table's columns, paper labels first, interval bounds last (shown as [lo, hi])."""
    out = pd.DataFrame(
        {
            "Editing Problem": frame["problem"].map(problem_label),
            "Method": frame["method"].map(method_label),
            "Metric": frame["metric"].map(metric_label),
            "Facts": frame["n_facts"],
            "Layers per fact": frame["layers_per_fact"],
            "Peak edited": frame["peak_edited"],
            "Default layer": frame["default_layer"],
            "Tracing-chosen": frame["tracing"],
            "Default": frame["default"],
            "Random (exact)": frame["random"],
            "Random (MC)": frame["random_mc"],
            "Tracing − random": frame["diff"],
            "p (draws)": frame["p_random"],
            "Tracing − default": frame["diff_default"],
        }
    )
    for label, stat in TABLE_INTERVALS:
        out[f"{label} low"] = frame[f"{stat}_lo"].to_numpy()
        out[f"{label} high"] = frame[f"{stat}_hi"].to_numpy()
    return out.reset_index(drop=True)


def interval_columns(ci_level: float) -> tuple[tuple[str, str, str], ...]:
    """(label, low column, high column) of each interval in :func:`display_frame`."""
    ci = f"{ci_level:.0%}"
    return tuple(
        (
            f"{label} {ci} {'range' if stat == 'random_draw' else 'CI'}",
            f"{label} low",
            f"{label} high",
        )
        for label, stat in TABLE_INTERVALS
    )


def table_notes(rb: RandomBaseline, cfg: AnalysisConfig) -> list[str]:
    """What each column means, in the terms of the module docstring."""
    ci = f"{cfg.ci_level:.0%}"
    draws = cfg.random_baseline.draws
    return [
        "Tracing-chosen: per fact, of the layers edited for it (successful edits with a tracing "
        f"effect), the one where its tracing effect ({cfg.trace.label()}) is largest, ties to the "
        f"lowest. Default: the edited layer nearest layer {rb.default_layer} (0-based; the "
        f"originals' default edit layer scaled to {rb.n_layers} layers), ties to the lower. "
        "Random: a uniformly random one of the same edited layers.",
        "Random (exact) is the expectation of a random layer (each fact's mean score over its "
        f"edited layers); Random (MC) the mean of {draws} seeded random assignments of one layer "
        f"per fact, and Random draws their {ci} range (chance variation with the facts fixed). "
        "p (draws): share of assignments scoring at least the tracing-chosen mean, (1 + k) / "
        f"(1 + {draws}).",
        f"Intervals of the means and differences: {cfg.bootstrap_samples} bootstrap resamples of "
        f"facts, percentile {ci}"
        + (
            " (bootstrap off: analysis.bootstrap_samples is 0)."
            if not cfg.bootstrap_samples
            else "."
        ),
        "Peak edited: share of facts whose tracing peak over all layers is one of their edited "
        "layers. Below 1, the edit grid does not contain every fact's peak and Tracing-chosen is "
        "the best-traced edited layer; edit every layer (edit.layers) for the exact comparison.",
        *rb.notes,
    ]


def _json_number(value: object) -> float | int | None:
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    number = float(value)  # type: ignore[arg-type]
    return round(number, 6) if math.isfinite(number) else None


#: The statistics of each condition kept in reports/metrics.json.
HEADLINE_STATS = (
    "tracing",
    "default",
    "random",
    "diff",
    "diff_lo",
    "diff_hi",
    "p_random",
    "n_facts",
)
#: Every statistic logged to MLflow.
MLFLOW_STATS = (
    *(f"{c}{b}" for c in CHOICES for b in ("", "_lo", "_hi")),
    "random_mc",
    "random_draw_lo",
    "random_draw_hi",
    "p_random",
    "peak_edited",
    "n_facts",
    "n_skipped",
)


def metrics_tree(rb: RandomBaseline | None) -> dict[str, dict]:
    """``{"random_baseline": {<problem>: {<method>: {<metric>: {stat: value}}}}}`` for metrics.json."""
    if rb is None or rb.frame.empty:
        return {}
    tree: dict[str, dict] = {}
    for _, row in rb.frame.iterrows():
        leaf = {stat: _json_number(row[stat]) for stat in HEADLINE_STATS}
        tree.setdefault(str(row["problem"]), {}).setdefault(str(row["method"]), {})[
            str(row["metric"])
        ] = leaf
    return {"random_baseline": tree}


def mlflow_metrics(rb: RandomBaseline | None) -> dict[str, float]:
    """``random_baseline.<dataset>.<problem>.<method>.<metric>.<stat>`` -> value, finite only."""
    if rb is None or rb.frame.empty:
        return {}
    out: dict[str, float] = {}
    for _, row in rb.frame.iterrows():
        prefix = ".".join(
            ["random_baseline"] + [str(row[k]) for k in ("dataset", "problem", "method", "metric")]
        )
        for stat in MLFLOW_STATS:
            value = float(row[stat])
            if math.isfinite(value):
                out[f"{prefix}.{stat}"] = value
    return out


def summary_lines(rb: RandomBaseline | None, headline: str = "rewrite_score") -> list[str]:
    """reports/summary.md: does tracing pick better edit layers than chance, in words."""
    if rb is None or rb.frame.empty:
        return []
    frame = rb.frame[np.isfinite(rb.frame["diff"].astype(float))]
    metric = headline if headline in set(frame["metric"]) else None
    if metric is None:
        if frame.empty:
            return []
        metric = str(frame["metric"].iloc[0])
    part = frame[frame["metric"] == metric]
    better = int((part["diff_lo"] > 0).sum())
    worse = int((part["diff_hi"] < 0).sum())
    lines = [
        f"Across {len(part)} method x problem conditions, the {metric_label(metric).lower()} at the "
        "edited layer where tracing peaks beats a random edited layer with a bootstrap interval "
        f"above 0 in {better}, falls below it in {worse}, and is indistinguishable in "
        f"{len(part) - better - worse} (random-location baseline, beyond the paper; "
        "tables/random_baseline.md)."
    ]
    ahead = int((part["diff_default_lo"] > 0).sum())
    behind = int((part["diff_default_hi"] < 0).sum())
    lines.append(
        f"Against the method's default layer it is better in {ahead}, worse in {behind} and "
        f"indistinguishable in {len(part) - ahead - behind} (the paper's question from the "
        "other side: does knowing where a fact is stored beat not asking?)."
    )
    head = part[(part["method"] == "rome") & (part["problem"] == "error_injection")]
    row = head.iloc[0] if not head.empty else (part.iloc[0] if not part.empty else None)
    if row is not None:
        p = row["p_random"]
        lines.append(
            f"{method_label(row['method'])}, {problem_label(row['problem'])}: tracing-chosen "
            f"{row['tracing']:.3f}, default layer {row['default']:.3f}, random layer "
            f"{row['random']:.3f}; tracing minus random {row['diff']:+.3f} "
            f"(CI {_fmt(row['diff_lo'])} to {_fmt(row['diff_hi'])}), "
            f"share of random draws at least as good p = {p:.3g}, over {int(row['n_facts'])} facts"
            + (", a small sample." if int(row["n_facts"]) < SMALL_SAMPLE_FACTS else ".")
        )
    return lines


def _fmt(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(float(value)) else "n/a"
