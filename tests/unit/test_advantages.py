"""Advantage estimators on hand-computed tensors, and the invariants: padding changes nothing, sequence-level
advantages reach every real token, unknown names are errors that list the valid ones."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    estimate_advantages,
    gae,
    grpo,
    needs_critic,
    reinforce_pp,
    rloo,
    token_rewards,
)
from rlhf_ray.algorithms.masked import masked_mean, masked_var


def _inputs(rewards, mask, group_ids=None, values=None, **kw) -> AdvantageInputs:
    rewards, mask = torch.tensor(rewards), torch.tensor(mask)
    ids = torch.zeros(len(rewards), dtype=torch.long) if group_ids is None else torch.tensor(group_ids)
    return AdvantageInputs(rewards, mask, ids, None if values is None else torch.tensor(values), **kw)


# -- token_rewards -------------------------------------------------------------------------------------------

def test_token_rewards_places_the_score_at_the_last_real_token_and_the_kl_everywhere():
    mask = torch.tensor([[1.0, 1.0, 0.0],
                         [1.0, 1.0, 1.0]])
    kl = torch.tensor([[1.0, 2.0, 99.0],
                       [0.5, 0.0, -1.0]])
    got = token_rewards(torch.tensor([1.0, 3.0]), kl, 0.1, mask)
    torch.testing.assert_close(got, torch.tensor([[-0.1, 1.0 - 0.2, 0.0],
                                                  [-0.05, 0.0, 3.0 + 0.1]]))


def test_token_rewards_without_kl_is_the_score_alone():
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    got = token_rewards(torch.tensor([2.0, -1.0]), None, 0.5, mask)
    torch.testing.assert_close(got, torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))


def test_token_rewards_of_an_empty_response_is_all_zero():
    mask = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    got = token_rewards(torch.tensor([5.0, 1.0]), torch.ones(2, 2), 0.1, mask)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [0.9, 0.0]]))


def test_token_rewards_checks_the_scores_shape():
    with pytest.raises(ValueError, match="scores"):
        token_rewards(torch.zeros(3), None, 0.0, torch.ones(2, 2))


# -- gae -----------------------------------------------------------------------------------------------------

def test_gae_by_hand():
    """γ = 0.9, λ = 0.8, r = [0, 0, 1], V = [0.5, 0.4, 0.6]:
    δ2 = 1 - 0.6 = 0.4                  A2 = 0.4
    δ1 = 0.9·0.6 - 0.4 = 0.14           A1 = 0.14 + 0.72·0.4 = 0.428
    δ0 = 0.9·0.4 - 0.5 = -0.14          A0 = -0.14 + 0.72·0.428 = 0.16816
    """
    inp = _inputs([[0.0, 0.0, 1.0]], [[1.0, 1.0, 1.0]], values=[[0.5, 0.4, 0.6]], gamma=0.9, lam=0.8)
    adv, ret = gae(inp)
    torch.testing.assert_close(adv, torch.tensor([[0.16816, 0.428, 0.4]]))
    torch.testing.assert_close(ret, torch.tensor([[0.66816, 0.828, 1.0]]))


def test_gae_stops_at_the_end_of_each_response():
    """Row 1 ends after 2 tokens: its V after the last token is 0, whatever the padding holds."""
    inp = _inputs([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]],
                  values=[[0.5, 0.4, 0.6], [1.0, 1.0, 50.0]], gamma=0.9, lam=0.8)
    adv, ret = gae(inp)
    # row 1: δ1 = 2 - 1 = 1, A1 = 1; δ0 = 0.9·1 - 1 = -0.1, A0 = -0.1 + 0.72 = 0.62
    torch.testing.assert_close(adv, torch.tensor([[0.16816, 0.428, 0.4], [0.62, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.66816, 0.828, 1.0], [1.62, 2.0, 0.0]]))


def test_gae_limits():
    """λ = 1: A = Monte-Carlo return - V. λ = 0: A = one-step TD error."""
    rewards, values, mask = [[1.0, -1.0, 2.0]], [[0.3, 0.2, 0.1]], [[1.0, 1.0, 1.0]]
    adv, _ = gae(_inputs(rewards, mask, values=values, gamma=0.5, lam=1.0))
    mc = torch.tensor([[1 - 0.5 + 0.5, -1 + 1.0, 2.0]])
    torch.testing.assert_close(adv, mc - torch.tensor(values))
    adv, _ = gae(_inputs(rewards, mask, values=values, gamma=0.5, lam=0.0))
    torch.testing.assert_close(adv, torch.tensor([[1 + 0.1 - 0.3, -1 + 0.05 - 0.2, 2 - 0.1]]))


def test_gae_needs_values():
    with pytest.raises(ValueError, match="critic values"):
        gae(_inputs([[1.0]], [[1.0]]))


# -- grpo / rloo ---------------------------------------------------------------------------------------------

# Two groups, interleaved: id 7 has returns [1, 0]; id 3 has returns [1, 2, 6]. Returns are sums over tokens.
GROUP_REWARDS = [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 1.0, 0.0], [1.0, 2.0, 3.0]]
GROUP_MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
GROUP_IDS = [7, 3, 3, 7, 3]


def _per_sequence(adv: torch.Tensor, mask) -> torch.Tensor:
    """The sequence's advantage, checking it is on every real token and 0 on padding."""
    mask = torch.tensor(mask).bool()
    first = adv[:, 0]
    assert torch.equal(adv, torch.where(mask, first.unsqueeze(1).expand_as(adv), torch.zeros_like(adv)))
    return first


def test_grpo_by_hand():
    adv, ret = grpo(_inputs(GROUP_REWARDS, GROUP_MASK, GROUP_IDS))
    assert ret is None
    # id 7: mean 1/2, unbiased std √(1/2): ±(1/2)/√(1/2) = ±√(1/2).
    # id 3: mean 3, deviations -2, -1, 3, unbiased std √((4 + 1 + 9) / 2) = √7.
    s2, s7 = math.sqrt(0.5), math.sqrt(7.0)
    expected = torch.tensor([s2, -2 / s7, -1 / s7, -s2, 3 / s7])
    torch.testing.assert_close(_per_sequence(adv, GROUP_MASK), expected, rtol=1e-5, atol=1e-5)


def test_grpo_group_of_one_and_equal_rewards_give_zero():
    adv, _ = grpo(_inputs([[1.0], [2.0], [2.0], [5.0]], [[1.0]] * 4, [0, 1, 1, 2]))
    assert torch.count_nonzero(adv) == 0


def test_rloo_by_hand():
    adv, ret = rloo(_inputs(GROUP_REWARDS, GROUP_MASK, GROUP_IDS))
    assert ret is None
    # id 7: 1 - 0, 0 - 1. id 3: 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2.
    expected = torch.tensor([1.0, -3.0, -1.5, -1.0, 4.5])
    torch.testing.assert_close(_per_sequence(adv, GROUP_MASK), expected)


def test_rloo_is_the_group_mean_baseline_scaled_by_n_over_n_minus_1():
    adv, _ = rloo(_inputs(GROUP_REWARDS, GROUP_MASK, GROUP_IDS))
    returns = torch.tensor([1.0, 1.0, 2.0, 0.0, 6.0])
    mean = torch.tensor([0.5, 3.0, 3.0, 0.5, 3.0])
    n = torch.tensor([2.0, 3.0, 3.0, 2.0, 3.0])
    torch.testing.assert_close(_per_sequence(adv, GROUP_MASK), n / (n - 1) * (returns - mean))


def test_rloo_group_of_one_gives_zero():
    adv, _ = rloo(_inputs([[1.0], [2.0], [4.0]], [[1.0]] * 3, [0, 1, 1]))
    torch.testing.assert_close(adv, torch.tensor([[0.0], [-2.0], [2.0]]))


# -- reinforce++ ---------------------------------------------------------------------------------------------

def test_reinforce_pp_by_hand():
    """γ = 0.5: row 0 r = [0, 0, 1] -> G = [0.25, 0.5, 1]; row 1 (one token) r = [2] -> G = [2].
    Whitened over the four real tokens with their mean and unbiased std."""
    inp = _inputs([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], gamma=0.5)
    adv, ret = reinforce_pp(inp)
    assert ret is None
    g = torch.tensor([0.25, 0.5, 1.0, 2.0])
    mean = g.sum() / 4
    std = (((g - mean) ** 2).sum() / 3).sqrt()
    w = (g - mean) / std
    torch.testing.assert_close(adv, torch.tensor([[w[0], w[1], w[2]], [w[3], 0.0, 0.0]]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked_var(adv, inp.mask), torch.tensor(1.0))
    assert abs(masked_mean(adv, inp.mask).item()) < 1e-6


# -- invariants over every estimator -------------------------------------------------------------------------

def _random_inputs(seed: int, gamma=0.9, lam=0.8) -> AdvantageInputs:
    gen = torch.Generator().manual_seed(seed)
    batch, width = 6, 5
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])
    mask = (torch.arange(width) < lengths.unsqueeze(1)).float()
    rewards = torch.randn(batch, width, generator=gen) * mask
    values = torch.randn(batch, width, generator=gen) * mask
    return AdvantageInputs(rewards, mask, torch.tensor([0, 0, 1, 1, 1, 2]), values, gamma, lam)


def _padded_with_garbage(inp: AdvantageInputs, extra: int = 3) -> AdvantageInputs:
    batch = inp.mask.shape[0]
    garbage = torch.full((batch, extra), 1e6)

    def pad(x):
        return torch.cat([torch.where(inp.mask.bool(), x, 1e6), garbage], dim=1)

    return AdvantageInputs(pad(inp.token_rewards), torch.cat([inp.mask, torch.zeros(batch, extra)], dim=1),
                           inp.group_ids, pad(inp.values), inp.gamma, inp.lam)


@pytest.mark.parametrize("name", list(ADVANTAGE_ESTIMATORS))
@pytest.mark.parametrize("seed", [0, 1])
def test_padding_never_changes_the_result(name, seed):
    inp = _random_inputs(seed)
    padded = _padded_with_garbage(inp)
    adv, ret = estimate_advantages(name, inp)
    adv_p, ret_p = estimate_advantages(name, padded)
    width = inp.mask.shape[1]
    torch.testing.assert_close(adv_p[:, :width], adv)
    assert torch.count_nonzero(adv_p[:, width:]) == 0
    torch.testing.assert_close(adv_p * (1 - padded.mask), torch.zeros_like(adv_p))
    assert (ret is None) == (ret_p is None) == (name != "gae")
    if ret is not None:
        torch.testing.assert_close(ret_p[:, :width], ret)
        assert torch.count_nonzero(ret_p[:, width:]) == 0


@pytest.mark.parametrize("name", list(ADVANTAGE_ESTIMATORS))
def test_empty_responses_do_not_crash_and_get_no_advantage(name):
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    inp = AdvantageInputs(torch.tensor([[0.0, 1.0], [0.0, 0.0], [3.0, 0.0]]), mask, torch.tensor([0, 0, 0]),
                          torch.zeros(3, 2))
    adv, _ = estimate_advantages(name, inp)
    assert torch.isfinite(adv).all() and torch.count_nonzero(adv[1]) == 0


def test_table_names_and_critic_needs():
    assert list(ADVANTAGE_ESTIMATORS) == ["gae", "grpo", "rloo", "reinforce++", "dr_grpo"]
    assert [needs_critic(n) for n in ADVANTAGE_ESTIMATORS] == [True, False, False, False, False]


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="gae, grpo, rloo, reinforce\\+\\+"):
        estimate_advantages("ppo", _random_inputs(0))
    with pytest.raises(ValueError, match="valid"):
        needs_critic("dpo")


def test_inputs_of_the_wrong_shape_are_errors():
    with pytest.raises(ValueError, match="mask"):
        AdvantageInputs(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        AdvantageInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="values"):
        AdvantageInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="gamma"):
        AdvantageInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), gamma=1.5)
