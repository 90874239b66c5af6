"""One `placement` section shared by every role, and RLHF's grad_accum derived once, in the config."""

from __future__ import annotations

import pytest

from rlhf_ray.config import PlacementConfig, RLHFConfig
from rlhf_ray.config_loader import ConfigError, config_help, load_config
from rlhf_ray.distributed.worker_group import group_spec
from rlhf_ray.stages.rlhf_roles import role_specs

BASE = ["data.train=prompts.jsonl", "run.max_steps=1", "reward.functions=[{path: m:f}]"]


def rlhf(*overrides: str) -> RLHFConfig:
    return load_config(RLHFConfig, None, [*BASE, *overrides])


def test_every_role_reads_the_same_placement_section_with_its_own_defaults():
    cfg = rlhf()
    assert cfg.learner.placement == cfg.generator.placement == PlacementConfig()
    assert cfg.reference.placement == cfg.reward.placement == PlacementConfig(cpus=0.5)
    cuda = role_specs(cfg, "cuda")
    # gpus null: a learner rank 1, an engine its tensor_parallel_size, a scorer none.
    assert [cuda[r].gpus_per_worker for r in ("policy learner", "generators", "reference", "reward", "critic")] == \
        [1.0, 1.0, 0.0, 0.0, 1.0]
    tp = role_specs(rlhf("generator.tensor_parallel_size=2"), "cuda")["generators"]
    assert tp.bundles() == [{"CPU": 1.0, "GPU": 2.0}]
    assert {s.gpus_per_worker for s in role_specs(cfg, "cpu").values()} == {0.0}


def test_placement_keys_set_what_each_worker_reserves():
    cfg = rlhf("reference.placement={cpus: 2, gpus: 0.25, resources: {rollout_node: 1}}",
               "learner.placement.strategy=SPREAD", "generator.placement.resources={rollout_node: 1}")
    specs = role_specs(cfg, "cuda")
    assert specs["reference"].bundles() == [{"CPU": 2.0, "GPU": 0.25, "rollout_node": 1.0}]
    assert specs["policy learner"].strategy == "SPREAD" and specs["generators"].strategy == "PACK"
    assert specs["generators"].bundles() == [{"CPU": 1.0, "rollout_node": 1.0, "GPU": 1.0}]
    # Keys given for a section merge over that role's defaults (the reward actor keeps its 0.5 CPUs).
    assert rlhf("reward.placement.gpus=0.5").reward.placement == PlacementConfig(cpus=0.5, gpus=0.5)
    assert group_spec("x", 2, PlacementConfig(cpus=3.0), 0.5, "cuda").bundles() == [{"CPU": 3.0, "GPU": 0.5}] * 2


@pytest.mark.parametrize("old, new", [
    ("learner.cpus_per_rank=2", "learner.placement.cpus"),
    ("critic.learner.gpus_per_rank=1", "critic.learner.placement.gpus"),
    ("learner.placement_strategy=SPREAD", "learner.placement.strategy"),
    ("generator.cpus_per_engine=2", "generator.placement.cpus"),
    ("generator.resources_per_engine={a: 1}", "generator.placement.resources"),
    ("reference.gpus_per_actor=0.5", "reference.placement.gpus"),
    ("reward.cpus_per_actor=1", "reward.placement.cpus"),
])
def test_the_old_flat_placement_keys_name_their_new_place(old, new):
    with pytest.raises(ConfigError, match=rf"`{old.split('=')[0]}` is now `{new}`"):
        rlhf(old)


def test_placement_help_is_printed_under_each_role():
    text = config_help(RLHFConfig)
    for role in ("learner", "generator", "reference", "reward", "critic.learner"):
        assert f"  {role}.placement.cpus = " in text and f"  {role}.placement.gpus = " in text
    # Each role's own default is what the help shows.
    assert "  reward.placement.cpus = 0.5 " in text and "  learner.placement.cpus = 1.0 " in text


def test_grad_accum_is_derived_once_in_the_config():
    # 16 prompts x 4 samples = 64 rollouts, 2 minibatches, 2 ranks: 16 per rank, micro-batches of 4 -> 4.
    cfg = rlhf("algorithm.prompts_per_step=16", "generator.samples_per_prompt=4", "algorithm.num_minibatches=2",
               "learner.num_ranks=2", "learner.micro_batch_size=4", "critic.learner.micro_batch_size=8")
    assert cfg.learner.grad_accum == 4 and cfg.learner.global_batch_size == 32
    assert cfg.critic.learner.grad_accum == 4  # 32 per rank (1 rank) in micro-batches of 8
    assert rlhf("algorithm.advantage=grpo", "critic.learner.micro_batch_size=3").critic.learner.grad_accum == 1
    # Given explicitly it must be the derived value (1, the default, is always accepted and replaced).
    same = rlhf("algorithm.prompts_per_step=16", "learner.micro_batch_size=8", "learner.grad_accum=8")
    assert same.learner.grad_accum == 8
    with pytest.raises(ConfigError, match=r"learner.grad_accum=3: RLHF derives it .* is 8\); leave it out or set 8"):
        rlhf("algorithm.prompts_per_step=16", "learner.micro_batch_size=8", "learner.grad_accum=3")
