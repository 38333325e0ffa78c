"""Synthetic tracing and edit tables in the stage schemas, with a known answer built in.

For tests and for trying the analyze stage before the sweep has run; never a substitute for
results (the stage only reads outputs/trace and outputs/edit).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

PROBLEMS_ALL = (
    "error_injection",
    "tracing_reversal",
    "fact_erasure",
    "fact_amplification",
    "fact_forcing",
)


def synthetic_effects(
    n_facts: int = 24,
    n_model_layers: int = 18,
    windows: tuple[int, ...] = (5,),
    zeroing: bool = True,
    seed: int = 0,
    low_denominator_facts: int = 0,
) -> pd.DataFrame:
    """Bump-shaped tracing curves (a random peak layer per fact), window-smoothed, plus zeroing."""
    rng = np.random.default_rng(seed)
    layers = np.arange(n_model_layers)
    rows = []
    for f in range(n_facts):
        fact_id = f"f{f:03d}"
        peak = rng.integers(0, n_model_layers)
        width = rng.uniform(1.0, 4.0)
        height = rng.uniform(0.2, 0.9)
        base = height * np.exp(-0.5 * ((layers - peak) / width) ** 2)
        p_clean = rng.uniform(0.2, 0.9)
        p_noised = rng.uniform(0.0, 0.05)
        low = f < low_denominator_facts
        for method in ("tracing", "zeroing") if zeroing else ("tracing",):
            for window in windows:
                # window of layers centred on each layer, clipped at the model's ends
                curve = np.array(
                    [
                        base[max(0, l - window // 2) : l + window - window // 2].mean()
                        for l in layers  # noqa: E741
                    ]
                ) * min(1.0, 0.6 + 0.1 * window)
                if method == "zeroing":
                    curve = 0.5 * curve + 0.05 * rng.random(n_model_layers)
                noisy = np.clip(curve + 0.02 * rng.standard_normal(n_model_layers), -0.05, 1.0)
                for layer in layers:
                    rows.append(
                        {
                            "fact_id": fact_id,
                            "method": method,
                            "kind": "mlp",
                            "window": window,
                            "layer": int(layer),
                            "effect_max": float(noisy[layer]),
                            "effect_last_subject": float(
                                0.8 * noisy[layer] + 0.02 * rng.standard_normal()
                            ),
                            "argmax_token": int(rng.integers(0, 5)),
                            "p_clean": float(p_clean),
                            "p_noised": float(p_noised if not low else p_clean - 0.001),
                            "low_denominator": bool(low),
                        }
                    )
    return pd.DataFrame(rows)


def synthetic_results(
    effects: pd.DataFrame,
    edit_layers: tuple[int, ...] = (1, 5, 9, 13, 17),
    methods: tuple[str, ...] = ("rome", "memit", "ft1", "ft5"),
    problems: tuple[str, ...] = ("error_injection",),
    layer_effect: float = 0.3,
    trace_effect: float = 0.0,
    noise: float = 0.05,
    n_failed: int = 0,
    dataset: str = "counterfact",
    seed: int = 0,
) -> pd.DataFrame:
    """Edit scores = layer profile + ``trace_effect`` x tracing effect (window 5, max) + noise."""
    rng = np.random.default_rng(seed)
    trace = effects[
        (effects["method"] == "tracing") & (effects["kind"] == "mlp") & (effects["window"] == 5)
    ]
    trace = trace.set_index(["fact_id", "layer"])["effect_max"]
    facts = sorted(effects["fact_id"].unique())
    profile = {layer: layer_effect * np.sin(1.0 + 0.4 * i) for i, layer in enumerate(edit_layers)}
    rows = []
    for method in methods:
        for problem in problems:
            for fact_id in facts:
                for layer in edit_layers:
                    t = float(trace.get((fact_id, layer), 0.0))
                    scores = {
                        name: 0.5
                        + profile[layer]
                        + trace_effect * t
                        + noise * rng.standard_normal()
                        for name in (
                            "rewrite_score",
                            "paraphrase_score",
                            "neighborhood_score",
                            "essence_score",
                        )
                    }
                    scores["overall_score"] = np.mean(
                        [
                            scores[k]
                            for k in ("rewrite_score", "paraphrase_score", "neighborhood_score")
                        ]
                    )
                    scores["overall_score_with_essence"] = np.mean(list(scores.values())[:4])
                    rows.append(
                        {
                            "fact_id": fact_id,
                            "layer": int(layer),
                            "method": method,
                            "problem": problem,
                            "dataset": dataset,
                            "status": "ok",
                            "reason": "",
                            **scores,
                            "rome_rewrite_prob_diff": scores["rewrite_score"] - 0.5,
                            "rome_rewrite_success": float(scores["rewrite_score"] > 0.5),
                            "rome_paraphrase_prob_diff": scores["paraphrase_score"] - 0.5,
                            "rome_paraphrase_success": float(scores["paraphrase_score"] > 0.5),
                            "rome_neighborhood_prob_diff": scores["neighborhood_score"] - 0.5,
                            "rome_neighborhood_success": float(scores["neighborhood_score"] > 0.5),
                            "p_target_pre": 0.01,
                            "p_target_post": 0.5,
                            "seconds": 1.0,
                            "hparams": json.dumps({"method": method}),
                        }
                    )
    df = pd.DataFrame(rows)
    if n_failed:
        idx = rng.choice(len(df), size=n_failed, replace=False)
        score_cols = [c for c in df.columns if c.endswith("_score")]
        df.loc[idx, "status"] = "failed"
        df.loc[idx, "reason"] = "nonfinite weights"
        df.loc[idx, score_cols] = np.nan
    return df
