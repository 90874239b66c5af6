"""Reward-model losses on hand-computed values: Bradley-Terry, ranking pairs, Plackett-Luce, rating error."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algorithms.losses import bradley_terry_loss, plackett_luce_loss, ranking_pairs, rating_loss

LOG2 = math.log(2.0)


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x), the Bradley-Terry loss of a difference -x."""
    return math.log1p(math.exp(x))


# --- bradley_terry_loss -------------------------------------------------------------------------

def test_bradley_terry_equal_rewards_cost_log_2():
    loss = bradley_terry_loss(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(loss, torch.tensor([LOG2, LOG2]))


def test_bradley_terry_hand_values():
    # diff 1 -> log(1 + e^-1); diff -2 -> log(1 + e^2).
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(loss, torch.tensor([softplus(-1.0), softplus(2.0)]))


def test_bradley_terry_margin_is_subtracted_from_the_difference():
    chosen, rejected = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 0.0])
    margin = torch.tensor([1.0, 0.5, -1.0])
    got = bradley_terry_loss(chosen, rejected, margin)
    # diff - margin = [0, 1.5, 1]
    torch.testing.assert_close(got, torch.tensor([LOG2, softplus(-1.5), softplus(-1.0)]))
    torch.testing.assert_close(got, bradley_terry_loss(chosen - margin, rejected))


def test_bradley_terry_zero_margin_equals_no_margin():
    chosen, rejected = torch.tensor([0.3, -1.2]), torch.tensor([0.1, 0.4])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, torch.zeros(2)),
                               bradley_terry_loss(chosen, rejected))


def test_bradley_terry_is_stable_for_large_differences():
    loss = bradley_terry_loss(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-30)
    assert loss[1].item() == pytest.approx(100.0)


def test_bradley_terry_depends_only_on_the_difference():
    chosen, rejected = torch.tensor([0.7, -0.2]), torch.tensor([0.1, 1.5])
    torch.testing.assert_close(bradley_terry_loss(chosen + 10.0, rejected + 10.0),
                               bradley_terry_loss(chosen, rejected))


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([0.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    margin = torch.tensor([0.0, 0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected, margin).sum().backward()
    # d/d chosen of -log σ(d) is -σ(-d): -1/2 at d = 0, -σ(-2) at d = 2.
    expected = -torch.sigmoid(torch.tensor([0.0, -2.0]))
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)
    torch.testing.assert_close(margin.grad, -expected)
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


# --- ranking_pairs ------------------------------------------------------------------------------

def test_ranking_pairs_of_the_docstring_example():
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]


def test_ranking_pairs_small_cases():
    assert ranking_pairs([0, 1]) == [(0, 1)]
    assert ranking_pairs([1, 0]) == [(1, 0)]
    assert ranking_pairs([0]) == []
    assert ranking_pairs([]) == []


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_ranking_pairs_are_all_k_choose_2_ordered_pairs(k):
    order = list(reversed(range(k)))
    pairs = ranking_pairs(order)
    assert len(pairs) == k * (k - 1) // 2
    assert len(set(pairs)) == len(pairs)
    position = {c: i for i, c in enumerate(order)}
    assert all(position[b] < position[w] for b, w in pairs)  # the better one is always ranked first
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in itertools.combinations(range(k), 2)}


# --- plackett_luce_loss -------------------------------------------------------------------------

def test_plackett_luce_of_two_equals_bradley_terry():
    for a, b in [(0.0, 0.0), (1.5, -0.5), (-2.0, 3.0)]:
        pl = plackett_luce_loss(torch.tensor([a, b]))
        bt = bradley_terry_loss(torch.tensor([a]), torch.tensor([b]))[0]
        torch.testing.assert_close(pl, bt)


def test_plackett_luce_hand_computed_three():
    # Rewards log 3, log 2, log 1: P(first) = 3/6, P(second | first gone) = 2/3, so -log(1/2 * 2/3) = log 3.
    rewards = torch.log(torch.tensor([3.0, 2.0, 1.0]))
    torch.testing.assert_close(plackett_luce_loss(rewards), torch.tensor(math.log(3.0)))


def test_plackett_luce_hand_computed_three_reversed():
    # Worst first: P = 1/6 * 2/5 -> -log(1/15) = log 15.
    rewards = torch.log(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(plackett_luce_loss(rewards), torch.tensor(math.log(15.0)))


def test_plackett_luce_equal_rewards_cost_log_k_factorial():
    for k in (2, 3, 4):
        torch.testing.assert_close(plackett_luce_loss(torch.zeros(k)), torch.tensor(math.log(math.factorial(k))))


def test_plackett_luce_is_invariant_to_adding_a_constant():
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.5])
    torch.testing.assert_close(plackett_luce_loss(rewards + 7.5), plackett_luce_loss(rewards))
    torch.testing.assert_close(plackett_luce_loss(rewards - 100.0), plackett_luce_loss(rewards))


def test_plackett_luce_probabilities_of_every_ranking_sum_to_one():
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    total = sum(torch.exp(-plackett_luce_loss(rewards[list(p)])).item()
                for p in itertools.permutations(range(4)))
    assert total == pytest.approx(1.0)


def test_plackett_luce_of_one_candidate_is_zero():
    assert plackett_luce_loss(torch.tensor([4.0])).item() == 0.0


def test_plackett_luce_is_stable_for_large_rewards():
    loss = plackett_luce_loss(torch.tensor([1000.0, 0.0, -1000.0]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_plackett_luce_gradient_raises_the_best_and_lowers_the_worst():
    rewards = torch.zeros(3, requires_grad=True)
    plackett_luce_loss(rewards).backward()
    # d/dr_0 = -(1 - 1/3); d/dr_1 = 1/3 - (1 - 1/2); d/dr_2 = 1/3 + 1/2.
    torch.testing.assert_close(rewards.grad, torch.tensor([-2 / 3, -1 / 6, 5 / 6]))
    assert rewards.grad.sum().item() == pytest.approx(0.0, abs=1e-6)  # shift invariance


# --- rating_loss ---------------------------------------------------------------------------------

def test_rating_loss_hand_values():
    got = rating_loss(torch.tensor([0.5, 1.0, -1.0]), torch.tensor([0.25, 1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([0.0625, 0.0, 1.0]))


def test_rating_loss_is_float32_for_low_precision_rewards():
    got = rating_loss(torch.tensor([0.5], dtype=torch.bfloat16), torch.tensor([0.0], dtype=torch.float64))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.25]))


def test_rating_loss_gradient_pulls_towards_the_target():
    predicted = torch.tensor([0.5, 0.0], requires_grad=True)
    rating_loss(predicted, torch.tensor([0.25, 1.0])).sum().backward()
    torch.testing.assert_close(predicted.grad, torch.tensor([0.5, -2.0]))  # 2 (p - t)
    torch.testing.assert_close(F.mse_loss(predicted.detach(), torch.tensor([0.25, 1.0]), reduction="none"),
                               rating_loss(predicted.detach(), torch.tensor([0.25, 1.0])))
