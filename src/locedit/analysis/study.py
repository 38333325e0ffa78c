"""The whole analysis on in-memory tables: every regression, correlation, interval and mixed model
for every variant of the tracing regressor, with a record of what was skipped and why.

The stage (``locedit.pipeline.analyze``) reads the parquet files, calls :func:`analyze`, and
writes tables and figures from the returned :class:`Analysis`.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from locedit.analysis.bootstrap import bootstrap_r2
from locedit.analysis.config import AnalysisConfig, TraceSpec
from locedit.analysis.data import (
    FLOORED_SCORES,
    JoinReport,
    available_windows,
    concentrated_facts,
    floor_scores,
    join_trace,
    normalise_effects,
    normalise_results,
    reference_regressor,
    trace_table,
)
from locedit.analysis.labels import method_rank, problem_rank
from locedit.analysis.random_baseline import RandomBaseline, model_depth, random_baseline
from locedit.analysis.regression import (
    Design,
    fit_regressions,
    layer_correlations,
    mixed_effects,
)

log = logging.getLogger(__name__)

MAIN = "main"
ZSRE = "zsre"


@dataclass(frozen=True)
class Variant:
    """One choice of the regressor ``trace`` (and of the facts), e.g. zeroing or window 10."""

    name: str
    spec: TraceSpec
    subset: str = "all"  # all | concentrated
    paper: str = ""  # where the paper reports it

    def label(self) -> str:
        extra = ", concentrated facts only" if self.subset == "concentrated" else ""
        return self.spec.label() + extra


@dataclass
class Analysis:
    """Everything the tables, figures and summary are made from."""

    config: AnalysisConfig
    regressions: pd.DataFrame
    correlations: pd.DataFrame
    variants: dict[str, Variant]
    joined: dict[str, pd.DataFrame]
    reports: dict[str, JoinReport]
    curves: pd.DataFrame  # main trace spec, every layer: fact_id, layer, trace, low_denominator
    concentration: pd.DataFrame | None
    main_dataset: str | None
    results: pd.DataFrame
    effects: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    random_baseline: RandomBaseline | None = None  # None: analysis.random_baseline.enabled false

    def regression(
        self, variant: str, dataset: str | None, method: str, problem: str, metric: str
    ) -> pd.Series | None:
        """The regression row for one condition, or None when it was not computed."""
        r = self.regressions
        if r.empty:
            return None
        hit = r[
            (r["variant"] == variant)
            & (r["dataset"] == dataset)
            & (r["method"] == method)
            & (r["problem"] == problem)
            & (r["metric"] == metric)
        ]
        return None if hit.empty else hit.iloc[0]


def pick_main_dataset(results: pd.DataFrame, preferred: str | None) -> str | None:
    """The dataset of Tables 1-7: ``preferred`` if present, else the most common non-zsRE one."""
    datasets = results["dataset"].value_counts()
    if datasets.empty:
        return None
    if preferred and preferred in datasets.index:
        return preferred
    others = [d for d in datasets.index if d != ZSRE]
    return others[0] if others else datasets.index[0]


def build_variants(
    effects: pd.DataFrame, cfg: AnalysisConfig
) -> tuple[dict[str, Variant], list[str]]:
    """The main regressor and the robustness variants that the effects table can support."""
    main = Variant(MAIN, cfg.trace, paper="Tables 1, 3-8; Figs. 4, 6, 15")
    variants = {MAIN: main}
    notes: list[str] = []
    for name in cfg.variants:
        if name == "last_subject":
            if cfg.trace.statistic != "effect_last_subject":
                variants[name] = Variant(
                    name, replace(cfg.trace, statistic="effect_last_subject"), paper="Fig. 16"
                )
        elif name == "zeroing":
            if cfg.trace.method != "zeroing":
                variants[name] = Variant(
                    name, replace(cfg.trace, method="zeroing"), paper="Figs. 21-22"
                )
        elif name == "windows":
            windows = [
                w
                for w in available_windows(effects, cfg.trace.method, cfg.trace.kind)
                if w != cfg.trace.window
            ]
            if not windows:
                notes.append(
                    f"Window-size variant (Fig. 12) skipped: effects.parquet has no {cfg.trace.method} "
                    f"{cfg.trace.kind} effects with a window other than {cfg.trace.window}."
                )
            for w in windows:
                variants[f"window_{w}"] = Variant(
                    f"window_{w}", replace(cfg.trace, window=w), paper="Fig. 12"
                )
        elif name == "concentrated":
            variants[name] = Variant(name, cfg.trace, subset="concentrated", paper="Table 2")
        elif name == "str":
            variant, note = _str_variant(effects, cfg.trace)
            if variant is not None:
                variants[name] = variant
            if note:
                notes.append(note)
    return variants, notes


def _str_variant(effects: pd.DataFrame, spec: TraceSpec) -> tuple[Variant | None, str | None]:
    """The main regressor with symmetric token replacement (Zhang & Nanda 2024) instead of
    Gaussian noise, when the trace stage ran with ``trace.corruption`` including ``str``."""
    if spec.method != "tracing":
        return None, None  # already STR, or zeroing: no noise to swap
    str_spec = replace(spec, method="tracing_str")
    if trace_table(effects, str_spec).empty:
        return None, (
            "STR variant skipped: effects.parquet has no symmetric-token-replacement rows "
            f"(tracing_str, {spec.kind}, window {spec.window}); trace with "
            "trace.corruption=[gaussian,str] to compare the corruptions."
        )
    return Variant("str", str_spec, paper="beyond the paper: Zhang & Nanda 2024"), None


def _seed(base: int, *key: object) -> int:
    """A reproducible per-condition seed, so adding a condition never shifts another's draws."""
    return int(
        np.random.SeedSequence([base, zlib.crc32("|".join(map(str, key)).encode())]).generate_state(
            1
        )[0]
    )


def analyze(effects: pd.DataFrame, results: pd.DataFrame, cfg: AnalysisConfig) -> Analysis:
    """Run every regression the paper reports (and the robustness checks) on the two tables."""
    effects = normalise_effects(effects)
    results = normalise_results(results)
    notes: list[str] = []
    main_dataset = pick_main_dataset(results, cfg.main_dataset)
    if cfg.main_dataset and main_dataset != cfg.main_dataset and main_dataset is not None:
        notes.append(
            f"No {cfg.main_dataset} rows in the results; tables use dataset {main_dataset}."
        )
    variants, more = build_variants(effects, cfg)
    notes.extend(more)

    curves = trace_table(effects, cfg.trace)
    concentration = None
    if "concentrated" in variants:
        if curves.empty:
            concentration = None
        else:
            concentration = concentrated_facts(
                curves, cfg.concentrated_max_other_layers, cfg.concentrated_fraction
            )

    joined: dict[str, pd.DataFrame] = {}
    reports: dict[str, JoinReport] = {}
    for name, variant in list(variants.items()):
        trace = curves if variant.spec == cfg.trace else trace_table(effects, variant.spec)
        if trace.empty:
            notes.append(
                f"Variant '{name}' ({variant.paper}) skipped: effects.parquet has no rows for {variant.spec.label()}."
            )
            del variants[name]
            continue
        if cfg.trace_regressor == "reference_code":
            trace = reference_regressor(trace)
        data, report = join_trace(
            floor_scores(results, cfg.score_floor, FLOORED_SCORES), trace, cfg.drop_low_denominator
        )
        if variant.subset == "concentrated":
            keep = (
                set(concentration.loc[concentration["concentrated"], "fact_id"])
                if concentration is not None
                else set()
            )
            data = data[data["fact_id"].isin(keep)].reset_index(drop=True)
            report = replace(report, n_used=len(data))
            if data.empty:
                notes.append(
                    "Concentrated subset (Table 2) is empty: no fact has its tracing effect concentrated in a few layers."
                )
        joined[name] = data
        reports[name] = report

    regressions, correlations = _fit_all(joined, variants, cfg)
    baseline = None
    if cfg.random_baseline.enabled and MAIN in joined:
        baseline = random_baseline(
            joined[MAIN],
            curves,
            cfg,
            model_depth(effects, results),
            lambda *key: _seed(cfg.seed, *key),
            main_dataset,
        )
    return Analysis(
        config=cfg,
        regressions=regressions,
        correlations=correlations,
        variants=variants,
        joined=joined,
        reports=reports,
        curves=curves,
        concentration=concentration,
        main_dataset=main_dataset,
        results=results,
        effects=effects,
        notes=notes,
        random_baseline=baseline,
    )


def _fit_all(
    joined: dict[str, pd.DataFrame], variants: dict[str, Variant], cfg: AnalysisConfig
) -> tuple[pd.DataFrame, pd.DataFrame]:
    jobs = []
    for name, data in joined.items():
        if data.empty:
            continue
        for (dataset, method, problem), part in data.groupby(
            ["dataset", "method", "problem"], sort=False
        ):
            jobs.append((name, dataset, method, problem, part.reset_index(drop=True)))
    rows, corr_rows = [], []
    for name, dataset, method, problem, part in tqdm(
        jobs, desc="regressions", disable=len(jobs) < 8
    ):
        design = Design.build(part)
        for metric in cfg.metrics:
            key = dict(variant=name, dataset=dataset, method=method, problem=problem, metric=metric)
            fit = fit_regressions(part, metric, design=design)
            row = {**key, "variant_label": variants[name].label(), **fit.as_dict()}
            # A saturated layer x trace fit (no residual degrees of freedom, e.g. 2 facts at 4
            # layers) fits every resample of all its facts exactly up to the solver's rank
            # cut-off: its "interval" would be rounding, and could exclude the estimate itself.
            if cfg.bootstrap_samples and fit.n and not fit.f_df_denom <= 0:
                seed = _seed(cfg.seed, *key.values())
                row.update(
                    bootstrap_r2(
                        part, metric, cfg.bootstrap_samples, seed, cfg.ci_level, design=design
                    )
                )
            if cfg.mixed_effects and name == MAIN and fit.n:
                row.update(mixed_effects(part, metric, design=design).as_dict())
            rows.append(row)
            corr_rows += [{**key, **r} for r in layer_correlations(part, metric).to_dict("records")]
    regressions = pd.DataFrame(rows)
    if not regressions.empty:
        regressions = _sorted(regressions)
    correlations = pd.DataFrame(corr_rows)
    if not correlations.empty:
        correlations = _sorted(correlations, extra=["layer"])
    return regressions, correlations


def _sorted(df: pd.DataFrame, extra: list[str] | None = None) -> pd.DataFrame:
    order = df.assign(
        _v=df["variant"].ne(MAIN),
        _p=df["problem"].map(problem_rank),
        _m=df["method"].map(method_rank),
    )
    cols = ["_v", "variant", "dataset", "_p", "_m", "metric"] + (extra or [])
    return (
        order.sort_values(cols, kind="stable")
        .drop(columns=["_v", "_p", "_m"])
        .reset_index(drop=True)
    )
