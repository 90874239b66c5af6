"""A run whose KL penalty has no weight (kl_coef 0, fixed controller) has no reference role: nothing is placed
for it, no reference forward runs, the experience carries no KL term and the step logs no KL (rather than a
made-up 0)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.roles.objectives import PolicyObjective
from rlhf_ray.rollout.experience import ExperienceParams, build_experience, kl_rows
from rlhf_ray.stages.rlhf_roles import check_gpu_shares, role_specs
from tests.unit.test_objectives import PROMPTS, REF, RESPONSES, lists

BASE = ["data.train=p.jsonl", "run.max_steps=1", "reward.functions=[{path: m:f}]", "algorithm.advantage=grpo"]


def rlhf(*overrides: str) -> RLHFConfig:
    return load_config(RLHFConfig, None, [*BASE, *overrides])


def test_the_reference_role_exists_only_when_the_kl_has_weight():
    assert rlhf().needs_reference and "reference" in role_specs(rlhf(), "cpu")
    off = rlhf("algorithm.kl_coef=0", "algorithm.kl_in=loss")
    assert not off.needs_reference and "reference" not in role_specs(off, "cpu")
    assert not PolicyObjective.of(off).kl_in_loss  # nothing to compare with
    assert rlhf("algorithm.kl_coef=0", "algorithm.kl_controller=adaptive").needs_reference  # it may grow
    check_gpu_shares(off, "cuda")  # no reference: no GPU share to ask for


def rollouts() -> pa.Table:
    return pa.table({
        "prompt_ids": pa.array(PROMPTS, pa.list_(pa.int32())), "response_ids": pa.array(RESPONSES, pa.list_(pa.int32())),
        "rollout_logprobs": lists([[-0.5, -1.0], [-2.0, -0.1, -0.3], [], [-0.7]]),
        "group": pa.array([0, 0, 1, 1], pa.int64()), "finish_reason": pa.array(["stop"] * 4),
        "prompt_text": pa.array(["p"] * 4), "response_text": pa.array(["r"] * 4), "metadata": pa.array(["{}"] * 4)})


def test_experience_without_a_reference_has_no_kl():
    rewards = pa.table({"score": pa.array([1.0, 0.0, 0.5, 0.25], pa.float32())})
    params = ExperienceParams("grpo", 0.0, "k1", True, 1.0, 0.95, False)
    table, stats = build_experience(rollouts(), None, rewards, None, None, params)
    assert "kl" not in stats
    assert table.column("ref_logprobs").to_pylist() == [[], [], [], []]
    assert kl_rows(table, "k1") == [[], [], [], []]
    with_ref, stats_ref = build_experience(rollouts(), REF, rewards, None, None, params)
    # With kl_coef 0 the KL changes no advantage: the same rows either way, and the KL is reported.
    assert table.column("advantages").to_pylist() == with_ref.column("advantages").to_pylist()
    assert stats_ref["kl"] == pytest.approx(sum(r - f for a, b in zip(
        [[-0.5, -1.0], [-2.0, -0.1, -0.3], [], [-0.7]], REF) for r, f in zip(a, b)) / 4, abs=1e-5)
