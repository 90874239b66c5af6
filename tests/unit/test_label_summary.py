"""Label statistics on hand-computed cases: Wilson interval, win rate, Cohen's kappa, agreement, summary."""

from __future__ import annotations

import math

import pytest

from rlhf_ray.label.items import LabelItem
from rlhf_ray.label.judgements import make_record
from rlhf_ray.label.summary import cohen_kappa, format_summary, summarize, wilson_interval, win_rate


@pytest.mark.parametrize("successes, n, low, high", [
    (7, 10, 0.3968, 0.8922),   # the textbook values of the Wilson score interval
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_interval(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_without_data_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_win_rate_counts_ties_as_half_or_leaves_them_out():
    outcomes = ["a"] * 6 + ["b"] * 2 + ["tie", "both_bad"]
    half = win_rate(outcomes, "half")
    assert (half.wins, half.losses, half.ties, half.both_bad, half.n) == (6, 2, 1, 1, 10)
    assert half.rate == pytest.approx(0.7)
    assert (half.low, half.high) == pytest.approx(wilson_interval(7, 10))
    excluded = win_rate(outcomes, "exclude")
    assert excluded.n == 8 and excluded.rate == pytest.approx(0.75)
    assert (excluded.low, excluded.high) == pytest.approx(wilson_interval(6, 8))
    assert win_rate(["tie"], "exclude").rate is None
    with pytest.raises(ValueError, match="outcomes must be"):
        win_rate(["x"])


def test_cohen_kappa_on_a_hand_computed_table():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(["x", "y"], ["y", "x"]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa(["x", "x"], ["x", "x"]))  # chance agreement 1: undefined


def item(i: int, k: int = 2) -> LabelItem:
    return LabelItem(f"i{i}", f"p{i}", tuple(f"r{i}-{j}" for j in range(k)), models=("rlhf", "sft") if k == 2 else ())


def test_pairwise_summary_counts_changes_ties_and_agreement():
    records = [make_record(item(i), "alice", "pairwise", {"choice": c}, [0, 1]) for i, c in enumerate([0, 0, 1, "tie"])]
    records.append(make_record(item(0), "alice", "pairwise", {"choice": 1}, [0, 1]))  # a change
    records += [make_record(item(i), "bob", "pairwise", {"choice": c}, [1, 0]) for i, c in enumerate([0, 0, 1])]
    summary = summarize(records, "pairwise")
    assert summary["judgements_logged"] == 8 and summary["judgements"] == 7 and summary["items_judged"] == 4
    assert summary["annotators"] == {"alice": {"judged": 4, "changed": 1, "tie": 1, "both_bad": 0},
                                     "bob": {"judged": 3, "changed": 0, "tie": 0, "both_bad": 0}}
    # Shared items 0..2: alice prefers candidate 1, 0, 1; bob (shown the other way round) candidate 1, 1, 0:
    # p_o = 1/3, p_e = (2*2 + 1*1) / 9 = 5/9, kappa = (1/3 - 5/9) / (4/9) = -0.5.
    agree = summary["agreement"]
    assert agree["items_judged_twice_or_more"] == 3
    assert agree["pairs"]["alice / bob"] == {"items": 3, "agreement": pytest.approx(1 / 3, abs=1e-4),
                                             "kappa": pytest.approx(-0.5, abs=1e-4)}
    assert agree["overall"] == agree["pairs"]["alice / bob"]
    assert "alice / bob" in format_summary(summary) and "ab" not in summary


def test_rating_and_ranking_agreement_use_spearman():
    ratings = [make_record(item(0, 3), "a", "rating", {"scores": [1, 3, 5]}, [0, 1, 2]),
               make_record(item(0, 3), "b", "rating", {"scores": [2, 3, 4]}, [0, 1, 2])]
    stats = summarize(ratings, "rating")["agreement"]["pairs"]["a / b"]
    assert stats == {"items": 1, "agreement": pytest.approx(1 / 3, abs=1e-4), "spearman": 1.0,
                     "mean_abs_difference": pytest.approx(2 / 3, abs=1e-4)}
    rankings = [make_record(item(0, 3), "a", "ranking", {"ranking": [0, 1, 2]}, [0, 1, 2]),
                make_record(item(0, 3), "b", "ranking", {"ranking": [2, 1, 0]}, [0, 1, 2]),
                make_record(item(1, 3), "a", "ranking", {"ranking": [0, 1, 2]}, [0, 1, 2]),
                make_record(item(1, 3), "b", "ranking", {"ranking": [1, 0, 2]}, [1, 0, 2])]  # the same ranking
    stats = summarize(rankings, "ranking")["agreement"]["pairs"]["a / b"]
    assert stats == {"items": 2, "agreement": 0.5, "spearman": 0.0}  # mean of rho -1 and +1


def test_ab_summary_reports_the_win_rate_of_a_over_b():
    choices = [0] * 6 + [1] * 2 + ["tie", "both_bad"]  # candidate 0 is model A's (rlhf)
    records = [make_record(item(i), "alice", "ab", {"choice": c}, [0, 1]) for i, c in enumerate(choices)]
    ab = summarize(records, "ab", "rlhf", "sft", "half")["ab"]
    assert (ab["a"], ab["b"], ab["wins"], ab["losses"], ab["ties"], ab["both_bad"], ab["n"]) == (
        "rlhf", "sft", 6, 2, 1, 1, 10)
    assert (ab["rate"], ab["low"], ab["high"]) == (0.7, 0.3968, 0.8922)
    text = format_summary(summarize(records, "ab", "rlhf", "sft", "half"))
    assert "win rate of rlhf over sft: 70.0% (95% CI 39.7% - 89.2%), n = 10" in text
