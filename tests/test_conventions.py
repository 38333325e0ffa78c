"""The conventions switch: `conventions=reference_code` changes exactly the original code's
choices listed in the README, and each choice does what the original does (issue 16)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from locedit.analysis.config import AnalysisConfig
from locedit.analysis.data import floor_scores, reference_regressor
from locedit.editing import hparams_for
from locedit.metrics.evaluation import EssenceTexts, essence_perplexity, score_edit
from locedit.pipeline.common import compose_params
from locedit.problems import PROBLEMS

ROOT = Path(__file__).resolve().parents[1]


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def test_reference_code_changes_exactly_the_listed_settings():
    paper = _flat(OmegaConf.to_container(compose_params(ROOT / "conf")))
    ref = _flat(OmegaConf.to_container(compose_params(ROOT / "conf", ["conventions=reference_code"])))
    changed = {k for k in set(paper) | set(ref) if paper.get(k, "absent") != ref.get(k, "absent")}
    expected = {
        "conventions",
        "analysis.score_floor",
        "analysis.trace_regressor",
        "analysis.drop_low_denominator",
        "edit.neighborhood_target",
        "edit.essence.span",
        "method.rome.early_stop_loss",
        "method.memit.early_stop_loss",
        "problem.overrides.error_injection.ft5.linf_eps",
        "problem.overrides.tracing_reversal.ft1.linf_eps",
        "problem.overrides.tracing_reversal.ft5.linf_eps",
        "problem.overrides.fact_erasure.ft1.linf_eps",
        "problem.overrides.fact_amplification.ft1.linf_eps",
        "problem.overrides.fact_forcing.ft5.linf_eps",
        "problem.overrides.fact_forcing.rome.v_steps",
        "problem.overrides.fact_forcing.rome.v_lr",
    }
    assert changed == expected
    assert paper["conventions"] == "paper_text" and ref["conventions"] == "reference_code"
    # Each is settable alone on top of the default.
    one = _flat(OmegaConf.to_container(compose_params(ROOT / "conf", ["edit.neighborhood_target=problem"])))
    assert {k for k in paper if paper[k] != one.get(k)} == {"edit.neighborhood_target"}


def test_reference_code_hyperparameters_reach_the_methods():
    ref = OmegaConf.to_container(compose_params(ROOT / "conf", ["conventions=reference_code"]))
    paper = OmegaConf.to_container(compose_params(ROOT / "conf"))
    rome = hparams_for("rome", ref, problem="fact_forcing")
    assert (rome.v_lr, rome.v_steps, rome.early_stop_loss) == (0.05, 50, 0.05)
    assert hparams_for("rome", paper, problem="fact_forcing").early_stop_loss is None
    assert hparams_for("ft1", ref, problem="tracing_reversal").linf_eps == 1e-3
    assert hparams_for("ft1", paper, problem="tracing_reversal").linf_eps == 1e-5
    assert hparams_for("ft5", ref, problem="error_injection").linf_eps == 1e-5


def test_score_floor_clips_as_the_original_evaluation():
    rows = pd.DataFrame(
        {
            "problem": ["fact_erasure", "error_injection", "error_injection"],
            "rewrite_score": [-0.5, -0.2, 0.4],
            "paraphrase_score": [0.1, -1.0, math.nan],
            "neighborhood_score": [-0.3, -0.3, 0.9],
        }
    )
    same = floor_scores(rows, "none", ("rewrite_score", "paraphrase_score"))
    pd.testing.assert_frame_equal(same, rows)
    out = floor_scores(rows, "reference_code", ("rewrite_score", "paraphrase_score"))
    assert out["rewrite_score"].tolist() == [0.0, 2e-8, 0.4]
    assert out["paraphrase_score"].tolist()[:2] == [0.1, 2e-8]
    assert math.isnan(out["paraphrase_score"].iloc[2])
    assert out["neighborhood_score"].tolist() == [-0.3, -0.3, 0.9]  # not clipped
    with pytest.raises(ValueError):
        AnalysisConfig(score_floor="sometimes")


def test_reference_regressor_keeps_every_fact_and_clips_at_zero():
    # Two facts: one with p_clean - p_noised = 0.2, one with -0.004 (flagged low).
    # restore values (p_restored - p_noised) per layer, by hand: fact a [-0.02, 0.1], fact b
    # at its best token [0.001, -0.002] (the stored effect is min restore / denominator).
    trace = pd.DataFrame(
        {
            "fact_id": ["a", "a", "b", "b"],
            "layer": [0, 1, 0, 1],
            "trace": [-0.02 / 0.2, 0.1 / 0.2, 0.001 / -0.004, -0.002 / -0.004],
            "low_denominator": [False, False, True, True],
            "denominator": [0.2, 0.2, -0.004, -0.004],
        }
    )
    out = reference_regressor(trace)
    np.testing.assert_allclose(out["trace"], [0.0, 0.5, 0.25, 0.0])
    assert not out["low_denominator"].any()


def test_neighborhood_target_problem_tracks_the_problems_object():
    pre = {
        "rewrite/0/o_true": 0.6, "rewrite/0/o_false": 0.01,
        "neighborhood/0/o_false": 0.1, "neighborhood/0/o_true": 0.3,
    }
    post = {
        "rewrite/0/o_true": 0.9, "rewrite/0/o_false": 0.01,
        "neighborhood/0/o_false": 0.1, "neighborhood/0/o_true": 0.5,
    }
    amplify = PROBLEMS["fact_amplification"]
    paper = score_edit(amplify, "o_true", pre, post)
    assert paper["neighborhood_score"] == pytest.approx(1.0)  # o_false did not move
    ref = score_edit(amplify, "o_true", pre, post, neighborhood_target="problem")
    assert ref["neighborhood_score"] == pytest.approx(1 - 0.2 / (0.5 + 0.2))


def test_essence_perplexity_whole_text_includes_the_prompt(tok):
    from locedit.testing import tiny_model

    model = tiny_model("gpt2", n_layers=2)
    seq = (464, 3290, 318, 257, 1643, 286, 262)
    texts = EssenceTexts(prompt_length=3, sequences=(seq,))
    with torch.no_grad():
        log_p = model(torch.tensor([seq])).logits.log_softmax(-1)[0]
    nll = [-float(log_p[i - 1, seq[i]]) for i in range(1, len(seq))]
    continuation = math.exp(sum(nll[2:]) / 4)
    whole = math.exp(sum(nll) / 6)
    assert essence_perplexity(model, texts) == pytest.approx(continuation, rel=1e-4)
    assert essence_perplexity(model, texts, "whole_text") == pytest.approx(whole, rel=1e-4)
