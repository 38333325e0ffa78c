"""Each metric against a hand computation on given probabilities (paper Sec. 3.4, App. C)."""

from __future__ import annotations

import math

import pytest

from locedit.metrics.evaluation import score_edit
from locedit.metrics.scores import (
    essence_score,
    neighborhood_score,
    overall_score,
    paraphrase_score,
    rewrite_score,
)
from locedit.problems import PROBLEMS


def test_rewrite_score_maximise_and_erasure_direction():
    assert rewrite_score(0.2, 0.6) == pytest.approx(0.4 / 0.8)
    assert rewrite_score(0.2, 0.1) == pytest.approx(-0.125)
    # Fact Erasure: (p - p*) / p
    assert rewrite_score(0.4, 0.1, "minimize") == pytest.approx(0.75)
    assert rewrite_score(0.4, 0.5, "minimize") == pytest.approx(-0.25)
    assert math.isnan(rewrite_score(1.0, 1.0))
    with pytest.raises(ValueError):
        rewrite_score(0.1, 0.2, "sideways")


def test_paraphrase_score_averages_all_paraphrases():
    assert paraphrase_score([0.0, 0.5], [0.5, 0.75]) == pytest.approx((0.5 + 0.5) / 2)
    assert paraphrase_score([0.5, 0.2], [0.25, 0.1], "minimize") == pytest.approx(0.5)
    assert math.isnan(paraphrase_score([], []))


def test_neighborhood_denominator_is_the_largest_possible_change():
    # p = 0.2: the largest change is to 1.0, i.e. 0.8 = 0.5 + |0.2 - 0.5|
    assert neighborhood_score([0.2], [0.6]) == pytest.approx(1 - 0.4 / 0.8)
    # p = 0.9: the largest change is to 0.0, i.e. 0.9
    assert neighborhood_score([0.9], [0.0]) == pytest.approx(0.0)
    assert neighborhood_score([0.3, 0.5], [0.3, 0.25]) == pytest.approx((1.0 + (1 - 0.25 / 0.5)) / 2)


def test_essence_score_clips_to_zero_and_five():
    assert essence_score(10.0, 9.0) == 1.0
    assert essence_score(10.0, 12.0) == pytest.approx(0.6)
    assert essence_score(10.0, 20.0) == 0.0
    assert overall_score(0.9, 0.6, 0.3) == pytest.approx(0.6)


def _probs(rewrite_false, rewrite_true, para_false, para_true, nb_false, nb_true):
    out = {"rewrite/0/o_false": rewrite_false, "rewrite/0/o_true": rewrite_true}
    for i, (f, t) in enumerate(zip(para_false, para_true, strict=True)):
        out[f"paraphrase/{i}/o_false"], out[f"paraphrase/{i}/o_true"] = f, t
    for i, (f, t) in enumerate(zip(nb_false, nb_true, strict=True)):
        out[f"neighborhood/{i}/o_false"], out[f"neighborhood/{i}/o_true"] = f, t
    return out


def test_score_edit_error_injection_and_rome_unscaled():
    pre = _probs(0.1, 0.6, [0.2, 0.0], [0.5, 0.4], [0.1, 0.5], [0.7, 0.3])
    post = _probs(0.82, 0.05, [0.6, 0.5], [0.2, 0.1], [0.2, 0.5], [0.6, 0.4])
    row = score_edit(PROBLEMS["error_injection"], "o_false", pre, post, 10.0, 11.0)
    assert row["rewrite_score"] == pytest.approx(0.72 / 0.9)
    assert row["paraphrase_score"] == pytest.approx((0.4 / 0.8 + 0.5) / 2)
    assert row["neighborhood_score"] == pytest.approx(((1 - 0.1 / 0.9) + 1.0) / 2)
    assert row["essence_score"] == pytest.approx(0.8)
    expected_overall = (row["rewrite_score"] + row["paraphrase_score"] + row["neighborhood_score"]) / 3
    assert row["overall_score"] == pytest.approx(expected_overall)
    assert row["overall_score_with_essence"] == pytest.approx((3 * expected_overall + 0.8) / 4)
    assert row["rome_rewrite_prob_diff"] == pytest.approx(0.77)
    assert row["rome_rewrite_success"] == 1.0
    assert row["rome_paraphrase_prob_diff"] == pytest.approx((0.4 + 0.4) / 2)
    # neighbours: success when the true object still wins
    assert row["rome_neighborhood_prob_diff"] == pytest.approx((0.4 - 0.1) / 2)
    assert row["rome_neighborhood_success"] == 0.5


def test_score_edit_fact_erasure_tracks_o_true_downwards():
    pre = _probs(0.1, 0.6, [0.2], [0.5], [0.1], [0.7])
    post = _probs(0.1, 0.15, [0.2], [0.25], [0.1], [0.7])
    row = score_edit(PROBLEMS["fact_erasure"], "o_true", pre, post)
    assert row["rewrite_score"] == pytest.approx(0.75)
    assert row["paraphrase_score"] == pytest.approx(0.5)
    assert row["neighborhood_score"] == pytest.approx(1.0)
    assert "essence_score" not in row
