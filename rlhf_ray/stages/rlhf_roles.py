"""The RLHF roles of one run, created from the config through placement groups, and how they score."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import ray

from rlhf_ray.algorithms.advantages import needs_critic
from rlhf_ray.config import LearnerConfig, ModelConfig, RLHFConfig
from rlhf_ray.config_loader import ConfigError
from rlhf_ray.distributed.runtime import cluster_device, worker_env_vars
from rlhf_ray.distributed.weight_transfer import WeightSync
from rlhf_ray.distributed.worker_group import (
    GroupSpec,
    WorkerGroup,
    check_total,
    group_spec,
)
from rlhf_ray.roles.generator import GeneratorGroup
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.roles.objectives import PolicyObjective, ValueObjective
from rlhf_ray.roles.scorers import ReferenceActor, RewardActor
from rlhf_ray.stages.rlhf_tasks import Scores


def learner_spec(learner: LearnerConfig, name: str, device: str) -> GroupSpec:
    """The placement of one DeepSpeed learner group (policy, critic, or a supervised stage's learner)."""
    return group_spec(name, learner.num_ranks, learner.placement, learner.gpus_per_rank, device)


def role_specs(cfg: RLHFConfig, device: str) -> dict[str, GroupSpec]:
    """What every role of the run reserves: one `GroupSpec` (bundles of CPU/GPU/custom resources) per role."""
    gen, ref, rew = cfg.generator, cfg.reference, cfg.reward
    specs = {
        "policy learner": learner_spec(cfg.learner, "policy-learner", device),
        "generators": group_spec("generator", gen.num_engines, gen.placement, gen.engine_gpus, device),
        "reward": group_spec("reward", rew.num_actors, rew.placement, rew.gpus_per_actor, device),
    }
    if cfg.needs_reference:
        specs["reference"] = group_spec("reference", ref.num_actors, ref.placement, ref.gpus_per_actor, device)
    if needs_critic(cfg.algorithm.advantage):
        specs["critic"] = learner_spec(cfg.critic.learner, "critic", device)
    return specs


def role_resources(cfg: RLHFConfig, device: str) -> dict[str, dict[str, float]]:
    """What each role reserves in all, for the up-front check against the cluster."""
    needs: dict[str, dict[str, float]] = {}
    for role, spec in role_specs(cfg, device).items():
        totals: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
        for bundle in spec.bundles():
            for key in ("CPU", "GPU"):
                totals[key] += bundle.get(key, 0.0)
        needs[role] = totals
    return needs


def check_gpu_shares(cfg: RLHFConfig, device: str) -> None:
    """On CUDA every model-holding scorer needs a GPU share of its own reservation.

    Ray 2.60 does not hide the GPUs from an actor that reserved none (CUDA_VISIBLE_DEVICES stays unset), so
    such an actor's `.to("cuda")` would land on physical GPU 0, which a learner rank or a vLLM engine owns.
    """
    if device != "cuda":
        return
    learners = [("learner", cfg.learner)] + ([("critic.learner", cfg.critic.learner)]
                                             if needs_critic(cfg.algorithm.advantage) else [])
    for key, learner in learners:
        check_rank_gpus(learner, key)
    holders = [("reference.placement.gpus", cfg.reference.gpus_per_actor, "the reference policy")] \
        if cfg.needs_reference else []
    if cfg.reward.model:
        holders.append(("reward.placement.gpus", cfg.reward.gpus_per_actor, "the reward model"))
    for key, gpus, what in holders:
        if gpus <= 0:
            raise ConfigError(f"{key}=0 on a CUDA run: the actor holding {what} would use GPU 0 without "
                              f"reserving it (where a learner or vLLM engine runs); give it a share, e.g. "
                              f"{key}=0.25 to colocate it with other roles on one GPU")


def check_rank_gpus(learner: LearnerConfig, key: str) -> None:
    """Ranks of one DeepSpeed job need a GPU each on CUDA: NCCL refuses two ranks of a group on one GPU."""
    if learner.num_ranks > 1 and learner.gpus_per_rank < 1:
        raise ConfigError(f"{key}.placement.gpus={learner.gpus_per_rank:g} with {key}.num_ranks={learner.num_ranks}: "
                          "ranks of one DeepSpeed job cannot share a GPU (NCCL refuses it); give each rank a whole "
                          f"GPU or use {key}.num_ranks=1")


def critic_start(cfg: RLHFConfig) -> str:
    """What the critic starts from: critic.path, else the reward model when it reads the policy's tokens
    (the critic scores the policy's token ids), else the policy. A reward model with another tokenizer is
    fine as the reward (it re-renders the text) but not as the critic's start."""
    from transformers import AutoTokenizer

    from rlhf_ray.models.tiny import resolve_model_path

    def vocab(path: str) -> dict:
        return AutoTokenizer.from_pretrained(resolve_model_path(path),
                                             trust_remote_code=cfg.policy.trust_remote_code).get_vocab()

    policy_vocab = vocab(cfg.policy.tokenizer or cfg.policy.path)
    if cfg.critic.path:
        if vocab(cfg.critic.path) != policy_vocab:
            raise ConfigError(f"critic.path={cfg.critic.path}: its tokenizer differs from the policy's "
                              f"({cfg.policy.tokenizer or cfg.policy.path}), but the critic reads the policy's "
                              "token ids; start it from a model with the policy's vocabulary (or null)")
        return cfg.critic.path
    if cfg.reward.model and vocab(cfg.reward.model) == policy_vocab:
        return cfg.reward.model
    return cfg.policy.path


def needed_cpus(cfg: RLHFConfig) -> int:
    """Logical CPUs the roles reserve (a local instance gets at least this many; on CPU they time-share)."""
    total = sum(role["CPU"] for role in role_resources(cfg, "cpu").values())
    return max(int(math.ceil(total)), os.cpu_count() or 1)


@dataclass
class Roles:
    """Every role of one RLHF run, each a group of Ray actors placed by `WorkerGroup`."""

    generators: GeneratorGroup
    reference: Optional[WorkerGroup]  # None when the KL has no weight (RLHFConfig.needs_reference)
    reward: WorkerGroup
    learners: LearnerGroup
    critic: Optional[LearnerGroup]
    sync: WeightSync
    # Whether scoring asks the learners for pi_old: not when the batch trains in one optimizer step (the
    # training forward is pi_old then; see PolicyObjective.single_update).
    pi_old: bool = True

    @classmethod
    def create(cls, cfg: RLHFConfig) -> "Roles":
        """Place and start every role. The roles start side by side (model loads, DeepSpeed set-up and vLLM
        start-up overlap); the weight-sync group is joined once all are up."""
        device = cluster_device(cfg.learner.device)
        check_gpu_shares(cfg, device)
        check_total(role_resources(cfg, device))
        specs = role_specs(cfg, device)
        algo = cfg.algorithm
        updates = cfg.run.max_steps * algo.ppo_epochs * algo.num_minibatches
        env = {"env_vars": worker_env_vars(device)}
        objective = PolicyObjective.of(cfg)
        learners = LearnerGroup(cfg.policy, cfg.learner, objective, updates, cfg.run.seed, device,
                                runtime_env=env, name="policy-learner", wait=False)
        critic = None
        if needs_critic(algo.advantage):
            critic_model = ModelConfig(path=critic_start(cfg),
                                       tokenizer=cfg.policy.tokenizer or cfg.policy.path, dtype=cfg.policy.dtype,
                                       trust_remote_code=cfg.policy.trust_remote_code)
            critic = LearnerGroup(critic_model, cfg.critic.learner, ValueObjective.of(cfg), updates, cfg.run.seed,
                                  device, runtime_env=env, name="critic", wait=False)
        generators = GeneratorGroup(cfg.policy.path, cfg.generator, cfg.run.seed, device, wait=False)
        ref_model = replace(cfg.policy, path=cfg.reference.path or cfg.policy.path, gradient_checkpointing=False)
        reference = WorkerGroup(ReferenceActor, specs["reference"], ref_model, cfg.reference.micro_batch_size,
                                device, objective.temperature, runtime_env=env) \
            if cfg.needs_reference else None
        reward = WorkerGroup(RewardActor, specs["reward"], cfg.reward, device, runtime_env=env)
        learners.ready()
        if critic is not None:
            critic.ready()
        generators.ready()
        for group in (reference, reward):
            if group is not None:
                group.wait_started()
        sync = WeightSync(cfg.sync, learners, generators)
        return cls(generators, reference, reward, learners, critic, sync, pi_old=not algo.single_update)

    def score(self, rollouts: ray.ObjectRef, n: int, policy: bool = True,
              temperature: Optional[float] = None, reward: Optional[list[ray.ObjectRef]] = None) -> Scores:
        """Start every scorer on the `n` rows of `rollouts` at once (each group shards the rows). `policy`: also
        the policy's own logprobs and (PPO) the critic's values. `temperature`: the one the reference scores at
        when the rollouts were not sampled at the training temperature (greedy evaluation: 1). `reward`: the
        rows' reward tables when they were scored already (dynamic sampling scores each round to filter it)."""
        rows = list(range(n))
        return Scores(
            reference=self.reference.map_shards(rows, lambda a, shard: a.logprobs.remote(rollouts, shard, temperature))
            if self.reference is not None else [],
            reward=reward if reward is not None else self.reward.map_shards(
                rows, lambda a, shard: a.score.remote(rollouts, shard)),
            old_logprobs=self.learners.response_logprobs(rollouts, n) if policy and self.pi_old else [],
            values=self.critic.response_values(rollouts, n) if policy and self.critic is not None else None)

    def shutdown(self) -> None:
        for group in (self.reference, self.reward, self.generators, self.learners, self.critic):
            if group is not None:
                group.shutdown()
