"""The pieces of the off-policy pipeline and of the skipped pi_old forward, on hand-computed tensors:
truncated importance weights, the weighted PPO loss, the policy objective with single_update (its training
forward is pi_old) and with truncated IS, max statistics across micro-batches, experience rows without pi_old,
and the config switches."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from rlhf_ray.algorithms.policy_loss import ppo_policy_loss, truncated_is_weights
from rlhf_ray.config import AlgorithmConfig, RLHFConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.roles.objectives import PolicyObjective, accumulate, step_metrics
from rlhf_ray.rollout.experience import ExperienceParams, build_experience
from tests.unit.test_objectives import ADVANTAGES, PAD, PROMPTS, REF, RESPONSES, ROWS, StandIn, direct, lists

# -- truncated importance weights ------------------------------------------------------------------------------

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 0.0, 0.0]])
ROLLOUT = torch.tensor([[-1.5, -1.0, -0.5], [-3.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_truncated_weights_cap_the_ratio_and_count_what_was_cut():
    weights, ratio_sum, over = truncated_is_weights(OLD, ROLLOUT, MASK, cap=2.0)
    # ratios: e^0.5 = 1.6487, e^-1 = 0.3679, e^0 = 1, e^2 = 7.389 (-> 2); padding 0
    want = torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0], [2.0, 0.0, 0.0]])
    assert torch.allclose(weights, want, atol=1e-6)
    assert ratio_sum.item() == pytest.approx(math.exp(0.5) + math.exp(-1.0) + 1.0 + math.exp(2.0), abs=1e-5)
    assert over.item() == 1.0
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_is_weights(OLD, ROLLOUT, MASK, cap=0.5)


def test_weighted_ppo_loss_scales_each_token():
    logprobs = OLD.clone().requires_grad_(True)  # ratio 1: the loss is -A per token
    advantages = torch.tensor([[1.0, -2.0, 3.0], [0.5, 9.0, 9.0]])
    weights = torch.tensor([[0.5, 2.0, 1.0], [1.5, 7.0, 7.0]])
    out = ppo_policy_loss(logprobs, OLD, advantages, MASK, 0.2, is_weights=weights)
    assert out.loss_sum.item() == pytest.approx(-(0.5 * 1.0 + 2.0 * -2.0 + 1.0 * 3.0 + 1.5 * 0.5), abs=1e-6)
    out.loss_sum.backward()
    assert torch.allclose(logprobs.grad, -advantages * weights * MASK)  # weights carry no gradient
    plain = ppo_policy_loss(OLD, OLD, advantages, MASK, 0.2)
    assert plain.loss_sum.item() == pytest.approx(-(1.0 - 2.0 + 3.0 + 0.5), abs=1e-6)


# -- the policy objective ------------------------------------------------------------------------------------------

def table(old, rollout) -> pa.Table:
    ids = pa.list_(pa.int32())
    return pa.table({"prompt_ids": pa.array(PROMPTS, ids), "response_ids": pa.array(RESPONSES, ids),
                     "old_logprobs": lists(old), "advantages": lists(ADVANTAGES), "ref_logprobs": lists(REF),
                     "rollout_logprobs": lists(rollout)})


def test_single_update_uses_the_training_forward_as_pi_old_and_reports_the_rollout_gap():
    model = StandIn()
    logp, _ = direct(model)
    rollout = [[x + 0.1 * (i + 1) for x in row] for i, row in enumerate(logp)]  # gaps 0.1, 0.2, -, 0.4
    stale_old = [[x - 5.0 for x in row] for row in logp]  # ignored by single_update
    single = PolicyObjective(single_update=True)
    out = single.loss(model, single.micro_batch(table(stale_old, rollout), ROWS, PAD))
    exact = PolicyObjective()
    ref = exact.loss(model, exact.micro_batch(table(logp, rollout), ROWS, PAD))
    assert out.loss_sum.item() == pytest.approx(ref.loss_sum.item(), abs=1e-6)  # ratio exactly 1
    assert out.token_stats["clip_fraction"].item() == 0.0
    assert out.token_stats["logprob_gap/mean"].item() == pytest.approx(2 * 0.1 + 3 * 0.2 + 0.4, abs=1e-5)
    assert out.max_stats["logprob_gap/max"].item() == pytest.approx(0.4, abs=1e-5)
    assert "logprob_gap/mean" not in ref.token_stats  # a separate pi_old forward reported it in the experience


def test_truncated_is_weights_the_policy_loss_by_pi_old_over_the_rollout_policy():
    model = StandIn()
    logp, _ = direct(model)
    rollout = [[x - math.log(1.5) for x in row] for row in logp]  # ratio 1.5 on every token
    weighted = PolicyObjective(single_update=True, rollout_is_cap=2.0)
    out = weighted.loss(model, weighted.micro_batch(table(logp, rollout), ROWS, PAD))
    plain = PolicyObjective(single_update=True).loss(model, weighted.micro_batch(table(logp, rollout), ROWS, PAD))
    assert out.loss_sum.item() == pytest.approx(1.5 * plain.loss_sum.item(), abs=1e-5)
    assert out.token_stats["rollout_is/ratio"].item() == pytest.approx(6 * 1.5, abs=1e-4)
    assert out.token_stats["rollout_is/clipped_fraction"].item() == 0.0
    capped = PolicyObjective(single_update=True, rollout_is_cap=1.2)
    out = capped.loss(model, capped.micro_batch(table(logp, rollout), ROWS, PAD))
    assert out.loss_sum.item() == pytest.approx(1.2 * plain.loss_sum.item(), abs=1e-5)
    assert out.token_stats["rollout_is/clipped_fraction"].item() == 6.0  # every real token cut
    metrics = step_metrics(accumulate({}, out), 6.0)
    assert metrics["rollout_is/clipped_fraction"] == 1.0 and metrics["rollout_is/ratio"] == pytest.approx(1.5)


def test_max_statistics_take_the_maximum_over_micro_batches():
    model = StandIn()
    logp, _ = direct(model)
    rollout = [[x + 0.1 * (i + 1) for x in row] for i, row in enumerate(logp)]
    objective = PolicyObjective(single_update=True)
    data = table(logp, rollout)
    totals: dict[str, float] = {}
    for rows in ([0, 1], [2, 3]):
        accumulate(totals, objective.loss(model, objective.micro_batch(data, rows, PAD)))
    metrics = step_metrics(totals, 6.0)
    assert metrics["logprob_gap/max"] == pytest.approx(0.4, abs=1e-5)
    assert metrics["logprob_gap/mean"] == pytest.approx((0.2 + 0.6 + 0.4) / 6, abs=1e-5)


def test_objective_of_config():
    cfg = load_config(RLHFConfig, None, ["data.train=p.jsonl", "run.max_steps=1", "reward.functions=[{path: m:f}]",
                                         "algorithm.off_policy_steps=1"])
    objective = PolicyObjective.of(cfg)
    assert objective.single_update and objective.rollout_is_cap == 2.0
    cfg = load_config(RLHFConfig, None, ["data.train=p.jsonl", "run.max_steps=1", "reward.functions=[{path: m:f}]",
                                         "algorithm.ppo_epochs=2"])
    objective = PolicyObjective.of(cfg)
    assert not objective.single_update and objective.rollout_is_cap is None


# -- experience without pi_old, config -----------------------------------------------------------------------------

def test_experience_without_pi_old_takes_the_rollout_logprobs():
    rollout = [[-0.5, -1.0], [-2.0, -0.1, -0.3], [], [-0.7]]
    rollouts = pa.table({
        "prompt_ids": pa.array(PROMPTS, pa.list_(pa.int32())), "response_ids": pa.array(RESPONSES, pa.list_(pa.int32())),
        "rollout_logprobs": lists(rollout), "group": pa.array([0, 0, 1, 1], pa.int64()),
        "finish_reason": pa.array(["stop"] * 4), "prompt_text": pa.array(["p"] * 4),
        "response_text": pa.array(["r"] * 4), "metadata": pa.array(["{}"] * 4)})
    rewards = pa.table({"score": pa.array([1.0, 0.0, 0.5, 0.25], pa.float32())})
    params = ExperienceParams("grpo", 0.1, "k1", True, 1.0, 0.95, False)
    table_, stats = build_experience(rollouts, REF, rewards, None, None, params)
    assert table_.column("old_logprobs").to_pylist() == table_.column("rollout_logprobs").to_pylist()
    kl = sum(r - f for row_r, row_f in zip(rollout, REF) for r, f in zip(row_r, row_f)) / 4  # k1 per response
    assert stats["kl"] == pytest.approx(kl, abs=1e-5)
    assert "logprob_gap/max" not in stats
    _, with_old = build_experience(rollouts, REF, rewards, rollout, None, params)
    assert with_old["logprob_gap/max"] == 0.0 and with_old["kl"] == pytest.approx(kl, abs=1e-5)


def test_off_policy_config_switches():
    assert not AlgorithmConfig().uses_rollout_is and AlgorithmConfig().single_update
    assert AlgorithmConfig(off_policy_steps=1).uses_rollout_is
    assert not AlgorithmConfig(off_policy_steps=1, rollout_is="off").uses_rollout_is
    assert AlgorithmConfig(rollout_is="truncated").uses_rollout_is
    assert not AlgorithmConfig(num_minibatches=2).single_update
    with pytest.raises(ConfigError, match=r"algorithm.off_policy_steps: must be <= 1, got 2"):
        load_config(RLHFConfig, None, ["data.train=p.jsonl", "run.max_steps=1", "algorithm.off_policy_steps=2"])
