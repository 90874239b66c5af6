"""The RL variants on hand-computed tensors: DAPO (clip-higher, dynamic sampling's group filter and refill
draw, overlong shaping), Dr. GRPO (advantage, constant loss normaliser), GSPO (sequence ratio), the filler
rows of a short dynamic-sampling step, and the config errors of bad combinations."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from rlhf_ray.algorithms.advantages import (
    GROUP_ESTIMATORS,
    AdvantageInputs,
    estimate_advantages,
    needs_critic,
)
from rlhf_ray.algorithms.dapo import informative_groups, overlong_penalty
from rlhf_ray.algorithms.policy_loss import (
    aggregate,
    ppo_policy_loss,
    sequence_log_ratio,
    truncated_is_weights,
)
from rlhf_ray.config import RLHFConfig
from rlhf_ray.config.rlhf import GROUP_ADVANTAGES
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.roles.objectives import PolicyObjective
from rlhf_ray.rollout.experience import (
    ExperienceParams,
    build_experience,
    pad_experience,
    sequence_scores,
)
from rlhf_ray.rollout.schema import EXPERIENCE_SCHEMA, ROLLOUT_SCHEMA
from rlhf_ray.stages.dynamic_sampling import join_kept, keep_informative, refill_prompts

# -- DAPO clip-higher -----------------------------------------------------------------------------------------

#            ρ     A     loss with ε = 0.2, ε_high = 0.28     clipped?   (symmetric 0.2 for comparison)
HIGH_CASES = [(1.25, 1.0, -1.25, False),                      # inside [0.8, 1.28]   (-1.2, clipped)
              (1.5, 1.0, -1.28, True),                        # capped at 1 + ε_high (-1.2)
              (0.7, -1.0, 0.8, True),                         # the lower clip is ε   (0.8)
              (1.5, -1.0, 1.5, False),                        # A < 0 above: unclipped (1.5)
              (0.9, 1.0, -0.9, False)]                        # inside                (-0.9)


def test_clip_higher_by_hand():
    ratio = torch.tensor([[c[0] for c in HIGH_CASES]])
    adv = torch.tensor([[c[1] for c in HIGH_CASES]])
    out = ppo_policy_loss(ratio.log(), torch.zeros_like(ratio), adv, torch.ones_like(ratio), 0.2,
                          clip_eps_high=0.28)
    assert out.loss_sum.item() == pytest.approx(sum(c[2] for c in HIGH_CASES), abs=1e-5)
    assert out.clip_fraction_sum.item() == sum(c[3] for c in HIGH_CASES)
    symmetric = ppo_policy_loss(ratio.log(), torch.zeros_like(ratio), adv, torch.ones_like(ratio), 0.2)
    assert symmetric.loss_sum.item() == pytest.approx(-1.2 - 1.2 + 0.8 + 1.5 - 0.9, abs=1e-5)
    same = ppo_policy_loss(ratio.log(), torch.zeros_like(ratio), adv, torch.ones_like(ratio), 0.2, clip_eps_high=0.2)
    assert same.loss_sum.item() == symmetric.loss_sum.item()


# -- Dr. GRPO --------------------------------------------------------------------------------------------------

def _scores_at_last_token(scores: list[float], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    rewards = torch.zeros_like(mask)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        rewards[i, n - 1] = s
    return rewards, mask


def test_dr_grpo_advantage_is_the_group_centred_return_without_std():
    rewards, mask = _scores_at_last_token([1.0, 0.0, 0.0, 2.0, 4.0, 7.0], [2, 1, 3, 1, 2, 1])
    inp = AdvantageInputs(rewards, mask, torch.tensor([0, 0, 0, 1, 1, 2]))
    adv, returns = estimate_advantages("dr_grpo", inp)
    # group 0: mean 1/3; group 1: mean 3; group 2 (one response): 0.
    per_sequence = [2 / 3, -1 / 3, -1 / 3, -1.0, 1.0, 0.0]
    assert returns is None
    torch.testing.assert_close(adv, torch.tensor(per_sequence).unsqueeze(1) * mask)
    grpo, _ = estimate_advantages("grpo", inp)
    # GRPO divides group 1 by its std sqrt(2) (and group 0 by sqrt(1/3)): Dr. GRPO does not.
    assert grpo[3, 0].item() == pytest.approx(-1.0 / math.sqrt(2.0), abs=1e-5)
    assert grpo[0, 0].item() == pytest.approx((2 / 3) / math.sqrt(1 / 3), abs=1e-5)
    assert "dr_grpo" in GROUP_ESTIMATORS and not needs_critic("dr_grpo")
    assert set(GROUP_ADVANTAGES) == GROUP_ESTIMATORS  # the config's copy of the table's set


def test_constant_aggregation_divides_by_max_tokens_and_counts_responses():
    per_token = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 2 empty: not counted
    total, count = aggregate(per_token, mask, "constant", max_tokens=4)
    assert total.item() == pytest.approx((1 + 2 + 3) / 4) and count.item() == 2
    # The normaliser does not depend on the lengths: any split of the batch sums to the same loss.
    a, ca = aggregate(per_token[:1], mask[:1], "constant", max_tokens=4)
    b, cb = aggregate(per_token[1:], mask[1:], "constant", max_tokens=4)
    assert (a + b).item() == pytest.approx(total.item()) and (ca + cb).item() == count.item()
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregate(per_token, mask, "constant")


def test_constant_aggregation_gives_every_token_the_same_gradient_whatever_its_length():
    """Dr. GRPO's point: with ratio 1, dL/dlogp_t = -A / max_tokens for every token of every response, where
    the sequence aggregation gives the short response's tokens a larger share (-A / |o_i|)."""
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    adv = torch.ones(2, 4) * mask
    grads = {}
    for aggregation in ("constant", "sequence"):
        logprobs = torch.zeros(2, 4, requires_grad=True)
        out = ppo_policy_loss(logprobs, torch.zeros(2, 4), adv, mask, 0.2, aggregation=aggregation, max_tokens=8)
        out.loss_sum.backward()
        grads[aggregation] = logprobs.grad
        assert out.count.item() == 2
    torch.testing.assert_close(grads["constant"], -mask / 8)
    torch.testing.assert_close(grads["sequence"], -torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]))


# -- GSPO ------------------------------------------------------------------------------------------------------

def test_sequence_log_ratio_is_the_mean_over_real_tokens():
    log_ratio = torch.tensor([[0.2, 0.4, 5.0], [-0.3, 5.0, 5.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    got = sequence_log_ratio(log_ratio * mask, mask)
    torch.testing.assert_close(got, torch.tensor([[0.3, 0.3, 0.0], [-0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gspo_clips_the_sequence_ratio_as_one():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    old = torch.zeros(3, 2)
    # Per-token log-ratios: row 0 (0.5, 0.1): mean 0.3, s = e^0.3 = 1.35 > 1.2 with A = 1: clipped, though the
    # second token alone (e^0.1) would not be; row 1: s = e^-0.3 = 0.74 < 0.8 with A = -1: clipped at 0.8;
    # row 2 (0.1, -0.1): s = 1, inside.
    logprobs = torch.tensor([[0.5, 0.1], [-0.3, 0.0], [0.1, -0.1]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [2.0, 2.0]])
    out = ppo_policy_loss(logprobs, old, adv, mask, 0.2, aggregation="sequence", importance_ratio="sequence")
    assert out.loss_sum.item() == pytest.approx(-1.2 + 0.8 - 2.0, abs=1e-5)
    assert out.count.item() == 3 and out.clip_fraction_sum.item() == 3  # both tokens of row 0, row 1's one
    token = ppo_policy_loss(logprobs, old, adv, mask, 0.2, aggregation="sequence")
    expected_token = (-1.2 - math.exp(0.1)) / 2 + 0.8 + (-2 * math.exp(0.1) - 2 * math.exp(-0.1)) / 2
    assert token.loss_sum.item() == pytest.approx(expected_token, abs=1e-5)


def test_gspo_gradient_flows_through_every_token_of_the_sequence_ratio():
    """Unclipped, L_i = -A s_i with s_i = exp(mean_t log-ratio): dL/dlogp_t = -A s_i / |y_i| on each token."""
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    logprobs = torch.tensor([[0.05, -0.02, 0.03, 0.0]], requires_grad=True)
    out = ppo_policy_loss(logprobs, torch.zeros(1, 4), torch.full((1, 4), 2.0), mask, 0.2,
                          aggregation="sequence", importance_ratio="sequence")
    out.loss_sum.backward()
    s = math.exp((0.05 - 0.02 + 0.03) / 3)
    assert out.loss_sum.item() == pytest.approx(-2 * s, abs=1e-6)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2 * s / 3] * 3 + [0.0]]))


def test_gspo_composes_with_clip_higher_and_truncated_is_weights():
    mask = torch.ones(1, 2)
    logprobs = torch.tensor([[0.25, 0.25]])  # s = e^0.25 = 1.284: beyond 1.28, clipped there
    out = ppo_policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), mask, 0.2, clip_eps_high=0.28,
                          importance_ratio="sequence")
    assert out.loss_sum.item() == pytest.approx(-2 * 1.28, abs=1e-5)
    # The rollout IS weights multiply each token's term: pi_old/pi_rollout = e^1 (capped at 2) and e^-1.
    weights, _, over = truncated_is_weights(torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), mask, 2.0)
    weighted = ppo_policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), mask, 0.2, clip_eps_high=0.28,
                               importance_ratio="sequence", is_weights=weights)
    assert over.item() == 1
    assert weighted.loss_sum.item() == pytest.approx(-1.28 * (2.0 + math.exp(-1.0)), abs=1e-5)
    with pytest.raises(ValueError, match="token, sequence"):
        ppo_policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), mask, 0.2, importance_ratio="group")


# -- DAPO overlong shaping -------------------------------------------------------------------------------------

def test_overlong_penalty_at_its_boundaries():
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 12])  # L_max 10, buffer 4: the zone starts after 6 tokens
    got = overlong_penalty(lengths, max_tokens=10, buffer=4, penalty=0.5)
    expected = [0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5]
    assert got.tolist() == pytest.approx(expected)
    assert overlong_penalty(torch.tensor([1, 3]), max_tokens=3, buffer=3, penalty=1.0).tolist() == \
        pytest.approx([-1 / 3, -1.0])
    for buffer in (0, 11):
        with pytest.raises(ValueError, match="overlong buffer"):
            overlong_penalty(lengths, max_tokens=10, buffer=buffer, penalty=1.0)


def _rollouts(responses: list[list[int]], groups: list[int]) -> pa.Table:
    n = len(responses)
    return pa.Table.from_pydict({
        "prompt_index": groups, "sample_index": list(range(n)), "group": groups,
        "prompt_ids": [[5, 6]] * n, "response_ids": responses, "rollout_logprobs": [[-0.5] * len(r) for r in responses],
        "finish_reason": ["length" if len(r) == 4 else "stop" for r in responses],
        "prompt_text": ["p"] * n, "response_text": ["r"] * n, "metadata": [json.dumps({})] * n,
        "prompt_messages": [[{"role": "user", "content": "p"}]] * n,
    }, schema=ROLLOUT_SCHEMA)


def _params(**kw) -> ExperienceParams:
    base = dict(advantage="dr_grpo", kl_coef=0.0, kl_estimator="k1", kl_in_reward=True, gamma=1.0, lam=0.95,
                whiten_advantages=False)
    return ExperienceParams(**{**base, **kw})


def test_overlong_penalty_is_added_to_the_score_and_logged_as_a_component():
    rollouts = _rollouts([[1], [1, 2, 3], [1, 2, 3, 4], [1, 2]], [0, 0, 1, 1])
    rewards = pa.table({"score": pa.array([1.0, 1.0, 0.0, 0.0], pa.float32())})
    params = _params(overlong_buffer=2, overlong_penalty=1.0, max_new_tokens=4)
    scores, penalty = sequence_scores(rollouts, rewards, params)
    assert penalty.tolist() == pytest.approx([0.0, -0.5, -1.0, 0.0])
    assert scores.tolist() == pytest.approx([1.0, 0.5, -1.0, 0.0])
    table, stats = build_experience(rollouts, None, rewards, None, None, params)
    assert table.column("score").to_pylist() == pytest.approx([1.0, 0.5, -1.0, 0.0])
    assert stats["reward/overlong"] == pytest.approx(-1.5 / 4) and stats["reward/mean"] == pytest.approx(0.125)
    # Dr. GRPO advantages of the shaped scores: group 0 mean 0.75, group 1 mean -0.5.
    assert [row[0] for row in table.column("advantages").to_pylist()] == pytest.approx([0.25, -0.25, -0.5, 0.5])
    _, off = sequence_scores(rollouts, rewards, _params(max_new_tokens=4))
    _, stats_off = build_experience(rollouts, None, rewards, None, None, _params(max_new_tokens=4))
    assert off is None and "reward/overlong" not in stats_off


# -- DAPO dynamic sampling -------------------------------------------------------------------------------------

def test_informative_groups_keeps_groups_whose_scores_differ():
    groups = torch.tensor([7, 7, 7, 3, 3, 9, 4, 4])
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, -0.25, -0.25])
    assert informative_groups(groups, scores).tolist() == [False, False, False, True, True, False, False, False]
    # A tiny difference (e.g. an overlong penalty on one response) makes a group informative.
    assert informative_groups(torch.tensor([0, 0]), torch.tensor([1.0, 1.0 - 1e-4])).tolist() == [True, True]
    assert informative_groups(torch.zeros(0, dtype=torch.long), torch.zeros(0)).tolist() == []
    with pytest.raises(ValueError, match="must both be"):
        informative_groups(torch.tensor([0, 0]), torch.tensor([1.0]))


def test_refill_prompts_are_unused_seeded_and_fewer_when_few_are_left():
    a = refill_prompts(10, used=[0, 1, 2], k=4, seed=[1, 5, 1])
    assert len(a) == 4 and not set(a) & {0, 1, 2} and len(set(a)) == 4
    assert refill_prompts(10, used=[0, 1, 2], k=4, seed=[1, 5, 1]) == a
    assert refill_prompts(10, used=[0, 1, 2], k=4, seed=[1, 5, 2]) != a
    assert sorted(refill_prompts(5, used=[0, 2, 4], k=4, seed=[0])) == [1, 3]
    assert refill_prompts(3, used=[0, 1, 2], k=2, seed=[0]) == []


def test_keep_informative_filters_a_round_on_the_shaped_scores():
    # Groups 0 and 2 have equal task scores; group 2's lengths differ, so its shaped scores do not.
    rollouts = _rollouts([[1], [2], [1, 2], [3], [1, 2, 3, 4], [1]], [0, 0, 1, 1, 2, 2])
    rewards = pa.table({"score": pa.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], pa.float32()),
                        "score/task": pa.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], pa.float32())})
    kept, kept_rewards, counts = keep_informative(rollouts, rewards, _params(max_new_tokens=4))
    assert kept.column("group").to_pylist() == [1, 1] and kept_rewards.column("score").to_pylist() == [0.0, 1.0]
    assert counts == {"groups": 3, "kept": 1, "tokens": 10, "nonfinite": 0}
    shaped = _params(max_new_tokens=4, overlong_buffer=2, overlong_penalty=1.0)
    kept, kept_rewards, counts = keep_informative(rollouts, rewards, shaped)
    assert kept.column("group").to_pylist() == [1, 1, 2, 2] and counts["kept"] == 2
    assert kept_rewards.column_names == ["score", "score/task"]  # unshaped: the experience shapes them once
    none, none_rewards, counts = keep_informative(rollouts.take([0, 1]), rewards.take([0, 1]), shaped)
    assert none.num_rows == none_rewards.num_rows == 0 and counts["kept"] == 0


def test_keep_informative_counts_nan_scores_which_drop_their_group():
    # NaN compares false, so a group with a NaN score looks uninformative: dropped, but counted (the step is
    # then skipped as a bad one by the driver's guard, not trained on the other groups as if all were well).
    rollouts = _rollouts([[1], [2], [1], [2]], [0, 0, 1, 1])
    rewards = pa.table({"score": pa.array([float("nan"), 1.0, 0.0, 1.0], pa.float32())})
    kept, _, counts = keep_informative(rollouts, rewards, _params(max_new_tokens=4))
    assert kept.column("group").to_pylist() == [1, 1]
    assert counts["nonfinite"] == 1 and counts["kept"] == 1


def test_join_kept_takes_the_first_groups_of_the_rounds_in_order():
    round1 = _rollouts([[1], [2]], [4, 4])
    round2 = _rollouts([[3], [4], [5], [6]], [7, 7, 9, 9])
    r1 = pa.table({"score": pa.array([0.0, 1.0], pa.float32())})
    r2 = pa.table({"score": pa.array([2.0, 3.0, 4.0, 5.0], pa.float32())})
    joined, rewards = join_kept(2, 2, [round1, round2], [r1, r2])
    assert joined.column("group").to_pylist() == [4, 4, 7, 7]
    assert rewards.column("row").to_pylist() == [0, 1, 2, 3]
    assert rewards.column("score").to_pylist() == [0.0, 1.0, 2.0, 3.0]
    all_of_them, _ = join_kept(5, 2, [round1, round1.slice(0, 0), round2], [r1, r1.slice(0, 0), r2])
    assert all_of_them.num_rows == 6


# -- filler rows of a short step: they weigh nothing -----------------------------------------------------------

class StandIn(torch.nn.Module):
    """Logits from the current token alone (an embedding): deterministic and differentiable."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(12, 12, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])


def _experience() -> pa.Table:
    responses = [[3, 4], [5], [6, 7, 8]]
    return pa.Table.from_pydict({
        "prompt_ids": [[1, 2], [1, 2], [2]], "response_ids": responses,
        "rollout_logprobs": [[-2.0] * len(r) for r in responses], "old_logprobs": [[-2.5] * len(r) for r in responses],
        "ref_logprobs": [[-2.2] * len(r) for r in responses], "values": [[]] * 3,
        "advantages": [[1.0, 1.0], [-0.5], [0.25, 0.25, 0.25]], "returns": [[]] * 3,
        "score": [1.0, 0.0, 0.5], "group": [0, 0, 1], "kl_coef": [0.1] * 3,
    }, schema=EXPERIENCE_SCHEMA)


def test_pad_experience_appends_empty_rows():
    padded = pad_experience(_experience(), 6)
    assert padded.schema == EXPERIENCE_SCHEMA and padded.num_rows == 6
    assert padded.column("response_ids").to_pylist()[3:] == [[], [], []]
    assert padded.column("group").to_pylist()[3:] == [-1] * 3
    assert pad_experience(_experience(), 3).num_rows == 3
    with pytest.raises(ValueError, match="cannot pad"):
        pad_experience(_experience(), 2)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_filler_rows_change_neither_the_loss_nor_its_count(aggregation):
    objective = PolicyObjective(aggregation=aggregation, kl_in_loss=True, entropy_coef=0.01, max_tokens=4,
                                importance_ratio="sequence", clip_eps_high=0.28)
    model = StandIn()
    real = objective.micro_batch(_experience(), [0, 1, 2], 0)
    padded_table = pad_experience(_experience(), 5)
    with_filler = objective.micro_batch(padded_table, [3, 0, 4, 1, 2], 0)
    only_filler = objective.micro_batch(padded_table, [3, 4], 0)
    a, b = objective.loss(model, real), objective.loss(model, with_filler)
    assert b.loss_sum.item() == pytest.approx(a.loss_sum.item(), abs=1e-6)
    assert objective.count(with_filler) == objective.count(real) == b.count.item() == a.count.item()
    empty = objective.loss(model, only_filler)
    assert empty.loss_sum.item() == 0.0 and objective.count(only_filler) == 0


# -- PolicyObjective from config, config errors ----------------------------------------------------------------

TRAIN = "data/generated/sft_train.jsonl"


def rlhf(*overrides: str) -> RLHFConfig:
    return load_config(RLHFConfig, None, [f"data.train={TRAIN}", "run.max_steps=3", *overrides])


def test_policy_objective_reads_the_variants_from_config():
    cfg = rlhf("algorithm.advantage=dr_grpo", "algorithm.loss_aggregation=constant", "algorithm.clip_eps_high=0.28",
               "algorithm.importance_ratio=sequence", "generator.max_new_tokens=24")
    objective = PolicyObjective.of(cfg)
    assert (objective.aggregation, objective.clip_eps_high, objective.importance_ratio, objective.max_tokens) == \
        ("constant", 0.28, "sequence", 24)
    assert PolicyObjective.of(rlhf()).clip_eps_high is None


@pytest.mark.parametrize("advantage", ["grpo", "rloo", "dr_grpo"])
def test_group_estimators_with_one_sample_per_prompt_are_config_errors(advantage):
    with pytest.raises(ConfigError, match="algorithm.advantage.*generator.samples_per_prompt"):
        rlhf(f"algorithm.advantage={advantage}", "generator.samples_per_prompt=1")


@pytest.mark.parametrize("advantage", ["gae", "reinforce++"])
def test_other_estimators_take_one_sample_per_prompt(advantage):
    assert rlhf(f"algorithm.advantage={advantage}", "generator.samples_per_prompt=1").rollouts_per_step == 16


@pytest.mark.parametrize("overrides, match", [
    (["algorithm.dynamic_sampling=true", "algorithm.advantage=gae"], "dynamic_sampling.*advantage=gae"),
    (["algorithm.dynamic_sampling=true", "algorithm.advantage=reinforce++"], "dynamic_sampling"),
    (["algorithm.dynamic_sampling=true", "algorithm.advantage=grpo", "algorithm.off_policy_steps=1"],
     "off_policy_steps"),
    (["algorithm.overlong_buffer=40", "generator.max_new_tokens=32"], "overlong_buffer.*max_new_tokens"),
    (["algorithm.dynamic_sampling_max_rounds=0"], "dynamic_sampling_max_rounds"),
    (["algorithm.clip_eps_high=0"], "clip_eps_high"),
    (["algorithm.importance_ratio=group"], "importance_ratio"),
    (["algorithm.loss_aggregation=batch"], "loss_aggregation"),
])
def test_bad_combinations_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        rlhf(*overrides)


def test_a_dapo_config_loads():
    cfg = rlhf("algorithm.advantage=grpo", "algorithm.dynamic_sampling=true", "algorithm.clip_eps_high=0.28",
               "algorithm.overlong_buffer=8", "algorithm.overlong_penalty=0.5", "algorithm.kl_coef=0")
    algo = cfg.algorithm
    assert algo.dynamic_sampling and algo.dynamic_sampling_max_rounds == 4 and algo.uses_overlong_shaping
    assert not cfg.needs_reference and not rlhf("algorithm.overlong_buffer=0").algorithm.uses_overlong_shaping
