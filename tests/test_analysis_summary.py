"""reports/summary.md says no more than the data (issue 27.6): a difference from the paper only
where an interval excludes the paper's value (and the F-test rejects "tracing adds nothing"),
every share with its n and interval, small samples named in the sentence."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from locedit.analysis import AnalysisConfig, analyze
from locedit.analysis.claims import (
    PAPER_MAX_ADDED_R2,
    adds_more_than_paper,
    sample,
    versus_paper,
)
from locedit.analysis.labels import method_label
from locedit.analysis.study import MAIN
from locedit.analysis.summary import summary_markdown
from locedit.analysis.synthetic import synthetic_effects, synthetic_results

LAYERS = (0, 5, 9, 17)


def _summary(n_facts: int, trace_effect: float, variants=("concentrated",), bootstrap=100):
    effects = synthetic_effects(n_facts=n_facts, n_model_layers=18, seed=1, zeroing=False)
    results = synthetic_results(
        effects, LAYERS, methods=("rome", "ft1"), trace_effect=trace_effect, noise=0.1, seed=2
    )
    an = analyze(
        effects,
        results,
        AnalysisConfig(
            bootstrap_samples=bootstrap,
            metrics=("rewrite_score",),
            variants=variants,
            mixed_effects=False,
        ),
    )
    rows = an.regressions[(an.regressions["variant"] == MAIN)]
    return summary_markdown(an, "tiny", tables=[], figures=[], notes=[]), rows


def _claimed(rows) -> set[str]:
    """The conditions where tracing adds more than the paper's largest value, by hand."""
    return {
        row["method"]
        for _, row in rows.iterrows()
        if row["added_r2_lo"] > PAPER_MAX_ADDED_R2 and row["f_pvalue"] < 0.05
    }


def test_wording_rules():
    assert versus_paper(0.5, 0.8, 0.947, "GPT-J value").startswith("below the paper's GPT-J value")
    assert versus_paper(0.95, 0.99, 0.947, "x").startswith("above")
    assert "no difference shown" in versus_paper(0.9, 0.99, 0.947, "x")
    assert "no difference" in versus_paper(math.nan, math.nan, 0.947, "x")
    # an interval above the paper's value needs the F-test too: added R² is never negative
    assert adds_more_than_paper(0.05, 0.4, 0.01)
    assert not adds_more_than_paper(0.05, 0.4, 0.3)
    assert not adds_more_than_paper(0.01, 0.4, 1e-6)
    assert sample(20, 5) == "n = 20 edits of 5 facts, a small sample"
    assert sample(400, 100) == "n = 400 edits of 100 facts"


def test_a_difference_is_stated_where_the_interval_excludes_the_papers_value():
    text, rows = _summary(40, trace_effect=1.0)
    claimed = _claimed(rows)
    assert claimed == {"rome", "ft1"}  # the synthetic truth: tracing drives the score
    verdict = next(line for line in text.splitlines() if "Unlike the paper's GPT-J result" in line)
    for _, row in rows.iterrows():
        ci = f"95% CI {100 * row['added_r2_lo']:.1f}% to {100 * row['added_r2_hi']:.1f}%"
        assert f"{100 * row['added_r2']:.1f}% ({method_label(row['method'])}, Error Injection; {ci})" in verdict
    assert "small sample" not in verdict
    assert "No condition shows a difference" not in text


def test_no_difference_is_stated_where_the_interval_includes_it():
    text, rows = _summary(40, trace_effect=0.0)
    assert _claimed(rows) == set()
    assert "Unlike the paper" not in text
    assert "**No condition shows a difference from the paper's finding" in text
    # every R² in the headline sentence comes with its interval and n
    head = next(line for line in text.splitlines() if line.startswith("For ROME on Error Injection"))
    assert head.startswith("For ROME on Error Injection (n = 160 edits of 40 facts)")
    assert len(re.findall(r"95% CI -?\d+\.\d% to \d+\.\d%", head)) == 3
    rome = rows[rows["method"] == "rome"].iloc[0]
    assert rome["r2_layer_hi"] < 0.947  # so the sentence may (and must) state the difference
    assert "below the paper's GPT-J value (94.7%): the interval excludes it" in head


def test_small_samples_say_so_in_the_sentence():
    # a difference from 5 facts: stated (its intervals exclude 3.2%), and called a small sample
    text, rows = _summary(5, trace_effect=2.0)
    assert _claimed(rows) == {"rome", "ft1"}
    across = next(line for line in text.splitlines() if line.startswith("Across 2 method x problem"))
    assert "(each with n = 20 edits of 5 facts, a small sample)" in across
    assert "Unlike the paper's GPT-J result" in across
    assert across.endswith("These rest on only 5 facts, a small sample: the intervals are wide "
                           "and the size of the difference is uncertain.")
    # no difference from 5 facts: not a replication either
    text, rows = _summary(5, trace_effect=0.0)
    assert _claimed(rows) == set()
    head = next(line for line in text.splitlines() if line.startswith("For ROME on Error Injection"))
    assert "(n = 20 edits of 5 facts, a small sample)" in head
    across = next(line for line in text.splitlines() if line.startswith("Across 2 method x problem"))
    assert "Unlike the paper" not in text
    assert across.endswith("With only 5 facts, a small sample, every interval is wide: this is no "
                           "evidence of a difference, not a replication of the paper.")
    # the robustness table gives n and the interval, and names its small samples
    table = [line for line in text.splitlines() if line.startswith("| causal tracing")]
    best = rows.loc[rows["added_r2"].idxmax()]
    ci = f"| {100 * best['added_r2_lo']:.1f}% to {100 * best['added_r2_hi']:.1f}% | 20 / 5 |"
    assert ci in table[0]
    assert "Small samples (fewer than 30 facts: wide or rough intervals, read no size into them): " \
        "causal tracing, MLP, window 5, max over tokens (5 facts)" in text


@pytest.mark.parametrize("n_facts", [40])
def test_the_robustness_table_states_a_difference_only_with_its_interval(n_facts):
    text, rows = _summary(n_facts, trace_effect=0.0)
    main_row = next(line for line in text.splitlines() if line.startswith("| causal tracing"))
    assert "no difference shown" in main_row
    assert np.isfinite(rows["added_r2_lo"]).all()


def test_without_intervals_no_difference_is_stated():
    text, _ = _summary(40, trace_effect=1.0, bootstrap=0)
    assert "Unlike the paper" not in text
    assert "Without bootstrap intervals (analysis.bootstrap_samples is 0, or too few facts) no " \
        "difference from the paper's GPT-J result is stated." in text
    assert "(no interval; without an interval no difference from the paper's GPT-J value" in text
