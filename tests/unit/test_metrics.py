"""Held-out statistics on hand-computed cases: average ranks with ties, Spearman, preference metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_ray.algorithms.metrics import average_ranks, preference_metrics, spearman


# --- average_ranks -------------------------------------------------------------------------------

def test_average_ranks_without_ties():
    np.testing.assert_array_equal(average_ranks([30.0, 10.0, 20.0]), [3.0, 1.0, 2.0])


def test_average_ranks_ties_share_the_mean_of_their_ranks():
    np.testing.assert_array_equal(average_ranks([1.0, 2.0, 2.0, 3.0]), [1.0, 2.5, 2.5, 4.0])
    np.testing.assert_array_equal(average_ranks([5, 1, 5, 1, 5]), [4.0, 1.5, 4.0, 1.5, 4.0])
    np.testing.assert_array_equal(average_ranks([7.0, 7.0, 7.0]), [2.0, 2.0, 2.0])


def test_average_ranks_edge_sizes():
    assert average_ranks([]).shape == (0,)
    np.testing.assert_array_equal(average_ranks([4.2]), [1.0])


def test_average_ranks_sum_to_n_n_plus_1_over_2():
    values = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    n = len(values)
    assert average_ranks(values).sum() == pytest.approx(n * (n + 1) / 2)


# --- spearman ------------------------------------------------------------------------------------

def test_spearman_perfect_agreement_and_disagreement():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)


def test_spearman_hand_computed_without_ties():
    # One swap among 4: sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_spearman_hand_computed_with_ties():
    # Ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, -.5, .5, 1.5];
    # rho = 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))


def test_spearman_is_invariant_to_monotone_transforms():
    x = [0.3, -1.2, 2.5, 0.9, 1.1]
    y = [1.0, 0.2, 0.7, 0.9, 0.1]
    rho = spearman(x, y)
    assert spearman(np.exp(x), y) == pytest.approx(rho)
    assert spearman([v ** 3 + 5 for v in x], [math.log(v) for v in y]) == pytest.approx(rho)
    assert spearman([-v for v in x], y) == pytest.approx(-rho)


def test_spearman_is_symmetric():
    x, y = [1, 5, 2, 8, 3], [2, 3, 1, 9, 4]
    assert spearman(x, y) == pytest.approx(spearman(y, x))


def test_spearman_of_a_constant_input_is_nan():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [0.5, 0.5, 0.5]))


def test_spearman_length_mismatch_is_an_error_with_both_lengths():
    with pytest.raises(ValueError, match=r"3 vs 2"):
        spearman([1, 2, 3], [1, 2])


# --- preference_metrics ------------------------------------------------------------------------

# A pair (right way round, diff +1), a ranking of 3 (two pairs right, one wrong), three ratings.
KINDS = ["pair", "ranking", "rating", "rating", "rating"]
ORDERS = [[0, 1], [2, 0, 1], [0], [0], [0]]
TARGETS = [[], [], [0.25], [0.75], [0.5]]
REWARDS = [[2.0, 1.0], [0.5, 1.0, 3.0], [0.1], [0.4], [0.9]]


def test_preference_metrics_on_mixed_rows():
    out = preference_metrics(KINDS, ORDERS, TARGETS, REWARDS)
    # Ordered pairs: pair (0,1): +1; ranking (2,0): +2.5, (2,1): +2, (0,1): -0.5.
    assert out["accuracy"] == pytest.approx(3 / 4)
    assert out["margin"] == pytest.approx((1.0 + 2.5 + 2.0 - 0.5) / 4)
    # Ratings: rewards rank [1, 2, 3], targets rank [1, 3, 2]: rho = 1 - 6 * 2 / (3 * 8) = 0.5.
    assert out["spearman"] == pytest.approx(0.5)
    every = [2.0, 1.0, 0.5, 1.0, 3.0, 0.1, 0.4, 0.9]
    assert out["reward_mean"] == pytest.approx(sum(every) / 8)
    assert out["reward_std"] == pytest.approx(float(np.std(every)))
    assert set(out) == {"accuracy", "margin", "spearman", "reward_mean", "reward_std"}


def test_preference_metrics_ties_count_as_wrong():
    out = preference_metrics(["pair"], [[0, 1]], [[]], [[1.0, 1.0]])
    assert out["accuracy"] == 0.0 and out["margin"] == 0.0


def test_preference_metrics_follow_the_order_not_the_candidate_index():
    out = preference_metrics(["pair"], [[1, 0]], [[]], [[0.0, 2.0]])
    assert out["accuracy"] == 1.0 and out["margin"] == pytest.approx(2.0)


def test_preference_metrics_without_ratings_has_no_spearman():
    out = preference_metrics(KINDS[:2], ORDERS[:2], TARGETS[:2], REWARDS[:2])
    assert "spearman" not in out and out["accuracy"] == pytest.approx(0.75)


def test_preference_metrics_ratings_only_have_no_accuracy():
    out = preference_metrics(KINDS[2:], ORDERS[2:], TARGETS[2:], REWARDS[2:])
    assert set(out) == {"spearman", "reward_mean", "reward_std"}
    assert out["spearman"] == pytest.approx(0.5)


def test_preference_metrics_one_rating_has_no_spearman():
    out = preference_metrics(["rating"], [[0]], [[0.5]], [[0.3]])
    assert "spearman" not in out
    assert out["reward_mean"] == pytest.approx(0.3) and out["reward_std"] == 0.0


def test_preference_metrics_of_no_rows_is_empty():
    assert preference_metrics([], [], [], []) == {}
