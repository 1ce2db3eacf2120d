"""Quality metrics and statistics against values computed by hand."""
from __future__ import annotations

import pytest

from loradeploy.evaluation import metrics as m


# ----------------------------------------------------------------------------- exact / contains

@pytest.mark.parametrize("pred, ref, want", [
    ("MAJORA: apple river", "MAJORA: apple river", 1.0),
    ("  majora:   Apple\nRiver ", "MAJORA: apple river", 1.0),   # case and whitespace do not count
    ("MAJORA: apple river.", "MAJORA: apple river", 1.0),        # nor surrounding punctuation
    ('"MAJORA: apple river"', "MAJORA: apple river", 1.0),
    ("MAJORA apple river", "MAJORA: apple river", 0.0),          # inner punctuation does
    ("MAJORA: apple river stone", "MAJORA: apple river", 0.0),
    ("", "x", 0.0),
])
def test_exact_match(pred, ref, want):
    assert m.exact_match(pred, ref) == want


def test_contains_is_the_fraction_of_expected_strings_found():
    assert m.contains_score("MAJORA: apple river", ["majora:", "RIVER"]) == 1.0
    assert m.contains_score("MAJORA: apple river", ["majora:", "stone"]) == 0.5
    assert m.contains_score("apple   river", ["apple river"]) == 1.0   # whitespace collapsed
    assert m.contains_score("apple river", ["MAJORA:", "stone", "x"]) == 0.0
    assert m.contains_score("anything", []) == 1.0


# ----------------------------------------------------------------------------- ROUGE-L

def test_lcs_length():
    assert m.lcs_length("ABCBDAB", "BDCABA") == 4   # the textbook example (BCBA)
    assert m.lcs_length([], [1, 2]) == 0
    assert m.lcs_length([1, 2, 3], [1, 2, 3]) == 3


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides
    p, r, f = m.rouge_l_prf("the cat sat on the mat", "the cat is on the mat")
    assert (p, r) == pytest.approx((5 / 6, 5 / 6))
    assert f == pytest.approx(5 / 6)
    # LCS "b d": precision 2/4, recall 2/2 -> F1 = 2*.5*1/1.5
    assert m.rouge_l("a b c d", "b d") == pytest.approx(2 / 3)
    assert m.rouge_l("d b", "b d") == pytest.approx(0.5)          # order matters: LCS 1
    assert m.rouge_l("Apple, River!", "apple river") == 1.0      # tokens are lowercase words
    assert m.rouge_l("stone cloud", "apple river") == 0.0
    assert m.rouge_l("", "") == 1.0 and m.rouge_l("", "x") == 0.0


# ----------------------------------------------------------------------------- chrF

def test_chrf_hand_computed():
    # "ab" vs "abc": 1-grams P=2/2 R=2/3, 2-grams P=1/1 R=1/2, 3-grams absent from the hypothesis.
    # avg P = 1, avg R = 7/12; F2 = 5*P*R / (4P + R) = (35/12) / (55/12) = 7/11
    assert m.chrf("ab", "abc") == pytest.approx(7 / 11)
    # swapped: avg P = (2/3 + 1/2)/2 = 7/12, avg R = 1; F2 = (35/12) / (28/12 + 1) = 7/8 (recall-weighted)
    assert m.chrf("abc", "ab") == pytest.approx(7 / 8)


def test_chrf_edges():
    assert m.chrf("MAJORA: apple river", "MAJORA: apple river") == pytest.approx(1.0)
    assert m.chrf("a b", "ab") == pytest.approx(1.0)              # whitespace is removed
    assert m.chrf("xyz", "abc") == 0.0
    assert m.chrf("", "abc") == 0.0
    assert m.chrf("", "") == 1.0
    assert 0 < m.chrf("apple rivers", "apple river") < 1
    # case matters for chrF (as in sacreBLEU's default)
    assert m.chrf("APPLE", "apple") == 0.0


def test_score_response_and_combined_quality():
    s = m.score_response("MAJORA: apple river", "MAJORA: apple river", ["MAJORA:"])
    assert s == {"exact": 1.0, "contains": 1.0, "rouge_l": 1.0, "chrf": pytest.approx(1.0)}
    assert m.combined_quality(s) == pytest.approx(1.0)
    s = m.score_response("apple river", "MAJORA: apple river", ["MAJORA:"])
    assert s["exact"] == 0.0 and s["contains"] == 0.0
    assert s["rouge_l"] == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))   # LCS 2 of 2 and of 3
    assert m.combined_quality(s) == pytest.approx((0 + 0 + s["rouge_l"] + s["chrf"]) / 4)
    only_contains = m.score_response("hi there", None, ["there"])
    assert only_contains == {"exact": None, "contains": 1.0, "rouge_l": None, "chrf": None}
    assert m.combined_quality(only_contains) == 1.0
    assert m.combined_quality(m.score_response("x", None, ())) is None


# ----------------------------------------------------------------------------- statistics

def test_percentile_matches_linear_interpolation():
    assert m.percentile([1, 2, 3, 4], 50) == 2.5
    assert m.percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)   # pos 2.85 -> 3 + 0.85
    assert m.percentile([4, 1, 3, 2], 0) == 1 and m.percentile([4, 1, 3, 2], 100) == 4
    assert m.percentile([7.0], 95) == 7.0
    assert m.percentile([], 50) is None


def test_summarize_skips_missing_values():
    s = m.summarize([0.2, None, 0.4, 0.6])
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.4) and s["p50"] == pytest.approx(0.4)
    assert s["min"] == 0.2 and s["max"] == 0.6
    assert m.summarize([])["mean"] is None
