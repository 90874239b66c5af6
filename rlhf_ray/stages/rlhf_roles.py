"""The RLHF roles of one run, created from the config through placement groups, and how they score."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Optional

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.algorithms.advantages import needs_critic
from rlhf_ray.algorithms.logprobs import scoring_temperature
from rlhf_ray.config import LearnerConfig, ModelConfig, RLHFConfig
from rlhf_ray.config_loader import ConfigError
from rlhf_ray.distributed.runtime import cluster_device, worker_env_vars
from rlhf_ray.distributed.weight_transfer import WeightSync
from rlhf_ray.distributed.worker_group import GroupSpec, check_total, reserve
from rlhf_ray.roles.generator import GeneratorGroup
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.roles.scorers import ReferenceActor, RewardActor


def learner_spec(learner: LearnerConfig, name: str, device: str) -> GroupSpec:
    """The placement of one DeepSpeed learner group (policy, critic, or a supervised stage's learner)."""
    return GroupSpec(name=name, num_workers=learner.num_ranks, cpus_per_worker=learner.cpus_per_rank,
                     gpus_per_worker=learner.gpus_per_rank if device == "cuda" else 0.0,
                     strategy=learner.placement_strategy, resources=tuple(sorted(learner.resources_per_rank.items())))


def role_specs(cfg: RLHFConfig, device: str) -> dict[str, GroupSpec]:
    """What every role of the run reserves: one `GroupSpec` (bundles of CPU/GPU/custom resources) per role."""
    gpu = device == "cuda"
    gen, ref, rew = cfg.generator, cfg.reference, cfg.reward
    specs = {
        "policy learner": learner_spec(cfg.learner, "policy-learner", device),
        "generators": GroupSpec("generator", gen.num_engines, gen.cpus_per_engine,
                                gen.engine_gpus if gpu else 0.0,
                                resources=tuple(sorted(gen.resources_per_engine.items()))),
        "reference": GroupSpec("reference", ref.num_actors, ref.cpus_per_actor, ref.gpus_per_actor if gpu else 0.0,
                               resources=tuple(sorted(ref.resources_per_actor.items()))),
        "reward": GroupSpec("reward", rew.num_actors, rew.cpus_per_actor, rew.gpus_per_actor if gpu else 0.0,
                            resources=tuple(sorted(rew.resources_per_actor.items()))),
    }
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
    holders = [("reference.gpus_per_actor", cfg.reference.gpus_per_actor, "the reference policy")]
    if cfg.reward.model:
        holders.append(("reward.gpus_per_actor", cfg.reward.gpus_per_actor, "the reward model"))
    for key, gpus, what in holders:
        if gpus <= 0:
            raise ConfigError(f"{key}=0 on a CUDA run: the actor holding {what} would use GPU 0 without "
                              f"reserving it (where a learner or vLLM engine runs); give it a share, e.g. "
                              f"{key}=0.25 to colocate it with other roles on one GPU")


def check_rank_gpus(learner: LearnerConfig, key: str) -> None:
    """Ranks of one DeepSpeed job need a GPU each on CUDA: NCCL refuses two ranks of a group on one GPU."""
    if learner.num_ranks > 1 and learner.gpus_per_rank < 1:
        raise ConfigError(f"{key}.gpus_per_rank={learner.gpus_per_rank:g} with {key}.num_ranks={learner.num_ranks}: "
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


def _rl_learner(cfg: RLHFConfig, learner):
    per_rank = cfg.rollouts_per_minibatch_per_rank(learner)
    if per_rank is None or per_rank % learner.micro_batch_size:
        raise ValueError(f"{cfg.rollouts_per_step} rollouts per step do not split into "
                         f"{cfg.algorithm.num_minibatches} minibatches x {learner.num_ranks} ranks x "
                         f"micro-batches of {learner.micro_batch_size}")
    return replace(learner, grad_accum=per_rank // learner.micro_batch_size)


def _actors(cls: type, name: str, count: int, cpus: float, gpus: float, resources: dict, device: str,
            *args: Any) -> tuple[Any, list]:
    """(placement group, actors): `count` actors of `cls`, one bundle each."""
    spec = GroupSpec(name=name, num_workers=count, cpus_per_worker=cpus,
                     gpus_per_worker=gpus if device == "cuda" else 0.0, resources=tuple(sorted(resources.items())))
    pg = reserve(spec)
    remote = ray.remote(cls)
    return pg, [remote.options(num_cpus=cpus, num_gpus=spec.gpus_per_worker,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                           runtime_env={"env_vars": worker_env_vars(device)}).remote(*args) for i in range(count)]


@dataclass
class Roles:
    generators: GeneratorGroup
    reference: list
    reward: list
    learners: LearnerGroup
    critic: Optional[LearnerGroup]
    sync: WeightSync
    placement_groups: list

    @classmethod
    def create(cls, cfg: RLHFConfig) -> "Roles":
        device = cluster_device(cfg.learner.device)
        check_gpu_shares(cfg, device)
        check_total(role_resources(cfg, device))
        algo = cfg.algorithm
        updates = cfg.run.max_steps * algo.ppo_epochs * algo.num_minibatches
        env = {"env_vars": worker_env_vars(device)}
        policy_opts = {"clip_eps": algo.clip_eps, "dual_clip": algo.dual_clip, "aggregation": algo.loss_aggregation,
                       "entropy_coef": algo.entropy_coef, "kl_in_loss": algo.kl_in == "loss",
                       "kl_estimator": algo.kl_estimator,
                       # The learner and the reference score tokens under the distribution vLLM sampled from.
                       "temperature": scoring_temperature(cfg.generator.temperature)}
        learners = LearnerGroup(cfg.policy, _rl_learner(cfg, cfg.learner), "policy", updates, cfg.run.seed, device,
                                runtime_env=env, name="policy-learner", objective_options=policy_opts)
        critic = None
        if needs_critic(algo.advantage):
            critic_model = ModelConfig(path=critic_start(cfg),
                                       tokenizer=cfg.policy.tokenizer or cfg.policy.path, dtype=cfg.policy.dtype,
                                       trust_remote_code=cfg.policy.trust_remote_code)
            critic = LearnerGroup(critic_model, _rl_learner(cfg, cfg.critic.learner), "value", updates,
                                  cfg.run.seed, device, runtime_env=env, name="critic",
                                  objective_options={"value_clip": algo.value_clip})
        generators = GeneratorGroup(cfg.policy.path, cfg.generator, cfg.run.seed, device)
        ref_model = replace(cfg.policy, path=cfg.reference.path or cfg.policy.path, gradient_checkpointing=False)
        r = cfg.reference
        ref_pg, reference = _actors(ReferenceActor, "reference", r.num_actors, r.cpus_per_actor, r.gpus_per_actor,
                                    r.resources_per_actor, device, ref_model, r.micro_batch_size, device,
                                    policy_opts["temperature"])
        w = cfg.reward
        reward_pg, reward = _actors(RewardActor, "reward", w.num_actors, w.cpus_per_actor, w.gpus_per_actor,
                                    w.resources_per_actor, device, w, device)
        sync = WeightSync(cfg.sync, learners, generators)
        return cls(generators, reference, reward, learners, critic, sync, [ref_pg, reward_pg])

    def score(self, rollouts: ray.ObjectRef, n: int, policy: bool = True,
              temperature: Optional[float] = None) -> tuple[list, list, list, Optional[list]]:
        """Start every scorer on `rollouts` at once; returns refs (reference, reward, policy logprobs, values).
        `temperature`: the one the reference scores at when the rollouts were not sampled at the training
        temperature (greedy evaluation: 1)."""
        ref = [a.logprobs.remote(rollouts, rows, temperature)
               for a, rows in zip(self.reference, _shard(n, len(self.reference)))]
        reward = [a.score.remote(rollouts, rows) for a, rows in zip(self.reward, _shard(n, len(self.reward)))]
        old = self.learners.response_logprobs(rollouts, n) if policy else []
        values = self.critic.response_values(rollouts, n) if policy and self.critic is not None else None
        return ref, reward, old, values

    def shutdown(self) -> None:
        for actor in self.reference + self.reward:
            ray.kill(actor)
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.generators.shutdown()
        self.learners.shutdown()
        if self.critic is not None:
            self.critic.shutdown()


def _shard(n: int, parts: int) -> list[list[int]]:
    return [list(range(i, n, parts)) for i in range(parts)]
