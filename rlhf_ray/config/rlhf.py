"""RLHF: generators, scorers, algorithm, critic, weight sync; and the SFT -> RM -> RLHF pipeline."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

from rlhf_ray.config.base import (
    DType,
    EvalConfig,
    LearnerConfig,
    ModelConfig,
    PlacementConfig,
    RunConfig,
)
from rlhf_ray.config.dpo import DPOConfig
from rlhf_ray.config.supervised import RMConfig, SFTConfig
from rlhf_ray.config_loader import ConfigError, doc

# The estimators whose baseline is the other responses to the prompt (advantages.GROUP_ESTIMATORS; the config
# does not import torch).
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo")


def _scorer_placement() -> PlacementConfig:
    return PlacementConfig(cpus=0.5)


@dataclass(frozen=True)
class GeneratorConfig:
    num_engines: int = doc("vLLM engines (Ray actors); prompts are sharded across them.", 1, ge=1)
    tensor_parallel_size: int = doc("Workers per engine (tensor parallel inside the engine): GPUs on CUDA; on CPU "
                                    "worker processes (vLLM-cpu, gloo between them).", 1, ge=1)
    samples_per_prompt: int = doc("Responses sampled per prompt (the group of GRPO/RLOO).", 4, ge=1)
    temperature: float = doc("Sampling temperature.", 1.0, gt=0.0)
    top_p: float = doc("Nucleus sampling threshold.", 1.0, gt=0.0, le=1.0)
    max_new_tokens: int = doc("Longest response in tokens.", 32, ge=1)
    dtype: DType = doc("Engine dtype; auto is float32 on CPU, bfloat16 on CUDA.", "auto")
    gpu_memory_utilization: float = doc("Share of each GPU's memory vLLM may use (GPU only).", 0.5,
                                        gt=0.0, le=1.0)
    cpu_kv_cache_gib: float = doc("KV-cache size in GiB on CPU (vLLM-cpu reserves it from system RAM).", 1.0,
                                  gt=0.0)
    enforce_eager: Optional[bool] = doc("Disable CUDA graphs; null: on for CPU (no graphs there), off on GPU.",
                                        None)
    in_process: bool = doc("Run the engine inside its actor (VLLM_ENABLE_V1_MULTIPROCESSING=0): starts in "
                           "about 5 s instead of 30 s on CPU, and weight updates need no serialisation.", True)
    placement: PlacementConfig = doc("What each engine reserves (gpus null: tensor_parallel_size; a fraction, "
                                     "tensor_parallel_size 1 only, shares a GPU with other roles: then lower "
                                     "gpu_memory_utilization to match). On CPU, placement.cpus is also the "
                                     "engine's thread count.", default_factory=PlacementConfig)
    env_vars: dict[str, str] = doc("Extra environment variables of every engine actor (e.g. NCCL_* or VLLM_* "
                                   "settings), over the ones rlhf_ray sets.", default_factory=dict)
    ignore_eos: bool = doc("Never stop before max_new_tokens (the end of turn and EOS are sampled like any "
                           "token): fixed-length responses for benchmarks; off for training.", False)

    def __post_init__(self):
        gpus = self.placement.gpus
        if gpus is not None and gpus != self.tensor_parallel_size and (gpus > 1 or self.tensor_parallel_size > 1
                                                                       or gpus == 0):
            raise ConfigError(f"generator.placement.gpus={gpus:g}: an engine with tensor_parallel_size="
                              f"{self.tensor_parallel_size} needs exactly that many GPUs; only a "
                              "tensor_parallel_size=1 engine may take a fraction of one GPU")

    @property
    def engine_gpus(self) -> float:
        """GPUs each engine reserves on CUDA."""
        return float(self.tensor_parallel_size if self.placement.gpus is None else self.placement.gpus)


@dataclass(frozen=True)
class SyncConfig:
    transport: Literal["collective", "object_store"] = doc(
        "How new policy weights reach the generators: a broadcast group joining learner rank 0 and every "
        "engine (gloo on CPU, NCCL on GPU), or safetensors bytes through the Ray object store.", "collective")
    bucket_mb: int = doc("Parameters are gathered and broadcast in buckets of about this many MB.", 64, ge=1)
    verify: Literal["never", "first", "every"] = doc(
        "Compare a checksum of every engine's weights with the learner's after the first sync or every sync.",
        "first")
    timeout_s: float = doc("Seconds a weight-sync collective (joining the group, each broadcast) may take before "
                           "the run stops with an error instead of hanging on a lost peer.", 300.0, gt=0.0)


@dataclass(frozen=True)
class PromptDataConfig:
    train: str = doc("RLHF prompts: rows {prompt}, {instruction, input?, output?} or {messages}; a file "
                     "(.jsonl/.json/.parquet) or a `datasets` name. Extra fields reach reward functions.", "")
    eval: Optional[str] = doc("Held-out prompts for evaluation; null holds out eval_fraction of train (seeded "
                              "by run.seed; those prompts are never trained on).", None)
    eval_fraction: float = doc("Share of train prompts held out for evaluation when eval is null (at most "
                               "eval.num_generate of them, at least one).", 0.05, gt=0.0, lt=1.0)
    max_prompt_length: int = doc("Prompts longer than this many tokens are left out and counted.", 256, ge=1)
    split: str = doc("Split to read when train/eval name a `datasets` dataset.", "train")
    skip_invalid: bool = doc("Skip and count malformed rows instead of stopping with an error.", False)


@dataclass(frozen=True)
class RewardFunctionConfig:
    path: str = doc("Import path `package.module:function` of fn(prompts, responses, metadata) -> floats.")
    weight: float = doc("Weight of this function in the summed score.", 1.0)


@dataclass(frozen=True)
class RewardConfig:
    model: Optional[str] = doc("Reward model directory (the `model/` of an `rlhf-ray rm` run); null for rule "
                               "rewards only.", None)
    model_weight: float = doc("Weight of the reward model's score in the summed score.", 1.0)
    normalize: bool = doc("Standardise the reward model's score with the mean/std saved with it "
                          "(reward_stats.json).", True)
    functions: tuple[RewardFunctionConfig, ...] = doc(
        "Rule-based rewards, e.g. [{path: my_package.rewards:is_correct, weight: 1.0}]; none by default "
        "(rlhf_ray.rewards.tasks:task_score grades only the synthetic demo tasks).", ())
    clip: Optional[float] = doc("Clip the summed score to [-clip, clip]; null: no clipping.", None, gt=0.0)
    num_actors: int = doc("Reward actors; rollouts are sharded across them.", 1, ge=1)
    timeout_s: Optional[float] = doc("Longest one reward call (one actor's shard of a step) may take; past it the "
                                     "actor is taken as hung, restarted and the step retried (run.max_restarts). "
                                     "null: no limit.", 600.0, gt=0.0)
    placement: PlacementConfig = doc("What each reward actor reserves (gpus null: none; on CUDA a reward model "
                                     "needs a share, e.g. 0.25).", default_factory=_scorer_placement)

    def require_source(self) -> None:
        """A run needs something to score with; checked when the run starts (a pipeline fills in `model`)."""
        if self.model is None and not self.functions:
            raise ConfigError("reward: give reward.model (a reward model directory) and/or reward.functions "
                              "(import paths of rule-based reward functions)")

    @property
    def gpus_per_actor(self) -> float:
        """GPUs each reward actor reserves on CUDA."""
        return self.placement.gpus or 0.0


@dataclass(frozen=True)
class ReferenceConfig:
    path: Optional[str] = doc("Reference policy for the KL term; null uses policy.path (the SFT model).", None)
    num_actors: int = doc("Reference actors; rollouts are sharded across them.", 1, ge=1)
    placement: PlacementConfig = doc("What each reference actor reserves (gpus null: none; on CUDA it needs a "
                                     "share, e.g. 0.25).", default_factory=_scorer_placement)
    micro_batch_size: int = doc("Sequences per forward pass.", 32, ge=1)
    timeout_s: Optional[float] = doc("Longest one reference call (one actor's shard of a step) may take; past it "
                                     "the actor is taken as hung, restarted and the step retried "
                                     "(run.max_restarts). null: no limit.", 600.0, gt=0.0)

    @property
    def gpus_per_actor(self) -> float:
        """GPUs each reference actor reserves on CUDA."""
        return self.placement.gpus or 0.0


@dataclass(frozen=True)
class AlgorithmConfig:
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce++"] = doc(
        "Advantage estimator: gae (PPO with a critic), grpo (group-normalised), dr_grpo (group mean subtracted, "
        "no std division: Dr. GRPO, with loss_aggregation=constant), rloo (leave-one-out), reinforce++ "
        "(batch-normalised returns).", "gae")
    prompts_per_step: int = doc("Prompts sampled per RL step (each answered generator.samples_per_prompt "
                                "times).", 16, ge=1)
    ppo_epochs: int = doc("Passes over each step's rollouts.", 1, ge=1)
    num_minibatches: int = doc("Optimizer steps per pass (the rollouts split evenly).", 1, ge=1)
    clip_eps: float = doc("PPO ratio clip: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high].", 0.2,
                          gt=0.0, lt=1.0)
    clip_eps_high: Optional[float] = doc("Upper ratio clip (DAPO's clip-higher, e.g. 0.28 with clip_eps 0.2); "
                                         "null: clip_eps.", None, gt=0.0)
    dual_clip: Optional[float] = doc("Dual-clip bound (> 1) for negative advantages; null: off.", None, gt=1.0)
    loss_aggregation: Literal["token", "sequence", "constant"] = doc(
        "Average the policy loss over all tokens of the batch (token; DAPO), per sequence then over sequences "
        "(sequence; GRPO), or sum each response's tokens, divide by generator.max_new_tokens, average over "
        "responses (constant; Dr. GRPO).", "token")
    importance_ratio: Literal["token", "sequence"] = doc(
        "PPO's per-token ratio, or GSPO's sequence ratio exp(mean log-ratio over the response), clipped per "
        "response (pair with loss_aggregation=sequence and small clips, e.g. 3e-4 / 4e-4, as in the paper).",
        "token")
    dynamic_sampling: bool = doc(
        "DAPO's dynamic sampling (grpo, dr_grpo, rloo): drop prompt groups whose scores are all equal (zero "
        "advantage) and refill the step from further prompts, up to dynamic_sampling_max_rounds generations; "
        "a step still short trains on the groups it has (logged as dynamic_sampling/shortfall_groups).", False)
    dynamic_sampling_max_rounds: int = doc("Most generation rounds per step with dynamic_sampling (the first "
                                           "included).", 4, ge=1)
    overlong_buffer: Optional[int] = doc(
        "DAPO's overlong reward shaping: in the last this-many tokens before generator.max_new_tokens the score "
        "falls linearly to -overlong_penalty (logged as reward/overlong); null or 0: off.", None, ge=0)
    overlong_penalty: float = doc("The overlong penalty at generator.max_new_tokens tokens.", 1.0, ge=0.0)
    entropy_coef: float = doc("Entropy bonus coefficient.", 0.0, ge=0.0)
    gamma: float = doc("Discount (gae, reinforce++).", 1.0, ge=0.0, le=1.0)
    lam: float = doc("GAE lambda.", 0.95, ge=0.0, le=1.0)
    value_clip: Optional[float] = doc("Value-loss clip around the old values; null: off.", 0.2, gt=0.0)
    whiten_advantages: bool = doc("Whiten GAE advantages over the batch.", True)
    kl_coef: float = doc("KL penalty coefficient (initial value when adaptive).", 0.05, ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = doc("KL estimator (Schulman 2020): k1 log-ratio, k2 squared, "
                                                   "k3 unbiased low-variance.", "k1")
    kl_in: Literal["reward", "loss"] = doc("Apply the KL penalty per token in the reward, or as a loss term.",
                                           "reward")
    kl_controller: Literal["fixed", "adaptive"] = doc("Fixed coefficient, or adapted towards kl_target "
                                                       "(Ziegler et al. 2019).", "fixed")
    kl_target: float = doc("Target KL per sequence for the adaptive controller.", 1.0, gt=0.0)
    kl_horizon: int = doc("Adaptive controller horizon in samples.", 10000, ge=1)
    off_policy_steps: int = doc(
        "0: each step generates, scores, trains, then syncs (on-policy). 1: step k+1's rollouts are generated "
        "while step k trains, by the weights one update old; the sync lands between steps.", 0, ge=0, le=1)
    rollout_is: Literal["auto", "off", "truncated"] = doc(
        "Truncated importance sampling on the learner/rollout ratio pi_old / pi_rollout (staleness of "
        "off_policy_steps, and any engine/learner mismatch): each token's policy loss is weighted by "
        "min(ratio, rollout_is_cap). auto: on when off_policy_steps > 0.", "auto")
    rollout_is_cap: float = doc("Cap of the truncated importance weight.", 2.0, ge=1.0)

    @property
    def uses_overlong_shaping(self) -> bool:
        return bool(self.overlong_buffer) and self.overlong_penalty > 0

    @property
    def uses_rollout_is(self) -> bool:
        return self.rollout_is == "truncated" or (self.rollout_is == "auto" and self.off_policy_steps > 0)

    @property
    def single_update(self) -> bool:
        """One optimizer step per batch of rollouts (ppo_epochs 1, one minibatch): the policy that trains is
        pi_old itself, so the PPO ratio is exactly 1 and no separate pi_old forward is needed."""
        return self.ppo_epochs == 1 and self.num_minibatches == 1


@dataclass(frozen=True)
class CriticConfig:
    path: Optional[str] = doc("Value model start (must read the policy's tokens); null: reward.model when its "
                              "tokenizer is the policy's, else policy.path.", None)
    learner: LearnerConfig = doc("The critic's DeepSpeed learner group (gae only).",
                                 default_factory=LearnerConfig)


@dataclass(frozen=True)
class RLHFConfig:
    """RLHF: maximise reward minus a KL penalty to the reference policy (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++;
    DAPO's and GSPO's variants)."""

    policy: ModelConfig = doc("The policy to train (usually the SFT model).", default_factory=ModelConfig)
    data: PromptDataConfig = doc("Prompts.", default_factory=PromptDataConfig)
    generator: GeneratorConfig = doc("vLLM generators.", default_factory=GeneratorConfig)
    reward: RewardConfig = doc("Reward model and/or rule-based reward functions (at least one).",
                               default_factory=RewardConfig)
    reference: ReferenceConfig = doc("Reference policy actors.", default_factory=ReferenceConfig)
    algorithm: AlgorithmConfig = doc("Advantages, losses, KL.", default_factory=AlgorithmConfig)
    learner: LearnerConfig = doc("The policy's DeepSpeed learner group.", default_factory=LearnerConfig)
    critic: CriticConfig = doc("The value model (PPO with gae only).", default_factory=CriticConfig)
    sync: SyncConfig = doc("Weight sync from learner to generators.", default_factory=SyncConfig)
    run: RunConfig = doc("Run directory, length (max_steps = RL steps), logging, checkpoints.",
                         default_factory=RunConfig)
    eval: EvalConfig = doc("Evaluation on held-out prompts: greedy answers' reward, KL, length, and their grade by "
                           "eval.checker.", default_factory=lambda: EvalConfig(max_new_tokens=None))

    def __post_init__(self):
        if not self.data.train:
            raise ConfigError("data.train: required; name a prompts file or a `datasets` name")
        if self.run.max_steps < 1:
            raise ConfigError("run.max_steps: RLHF runs by steps; set run.max_steps >= 1")
        if self.generator.top_p < 1.0:
            # vLLM's logprobs and the learner's would then describe different distributions (the learner cannot
            # renormalise over a nucleus it never saw), so the PPO ratio and KL would refer to another policy.
            raise ConfigError(f"generator.top_p={self.generator.top_p:g}: RLHF samples from the full distribution "
                              "(top_p must be 1.0) so that the learner's logprobs are those of the sampling policy; "
                              "use generator.temperature to sharpen it")
        self._check_algorithm()
        # grad_accum follows from the step's shape: set it here, once (frozen: hence object.__setattr__).
        object.__setattr__(self, "learner", self._with_grad_accum(self.learner, "learner"))
        if self.algorithm.advantage == "gae":  # the critic trains on the same minibatches
            critic = replace(self.critic, learner=self._with_grad_accum(self.critic.learner, "critic.learner"))
            object.__setattr__(self, "critic", critic)

    def _check_algorithm(self) -> None:
        """Combinations of algorithm and generator keys that would train on nothing or on something else."""
        algo, gen = self.algorithm, self.generator
        group = algo.advantage in GROUP_ADVANTAGES
        if group and gen.samples_per_prompt < 2:
            raise ConfigError(f"algorithm.advantage={algo.advantage} with generator.samples_per_prompt="
                              f"{gen.samples_per_prompt}: a group-relative baseline needs at least 2 responses per "
                              "prompt (with 1 every advantage is 0); set generator.samples_per_prompt >= 2 or use "
                              "gae or reinforce++")
        if algo.dynamic_sampling and not group:
            raise ConfigError(f"algorithm.dynamic_sampling with algorithm.advantage={algo.advantage}: dynamic "
                              "sampling drops groups whose group-relative advantage is 0; use grpo, dr_grpo or rloo")
        if algo.dynamic_sampling and algo.off_policy_steps:
            raise ConfigError("algorithm.dynamic_sampling with algorithm.off_policy_steps=1: refill rounds wait "
                              "for the rewards, which the off-policy overlap exists to avoid; set one of them off")
        if algo.overlong_buffer and algo.overlong_buffer > gen.max_new_tokens:
            raise ConfigError(f"algorithm.overlong_buffer={algo.overlong_buffer} exceeds generator.max_new_tokens="
                              f"{gen.max_new_tokens}: the penalty zone is the last overlong_buffer tokens before "
                              "the limit")

    def _with_grad_accum(self, learner: LearnerConfig, key: str) -> LearnerConfig:
        """`learner` with the grad_accum that makes one optimizer step of a minibatch: each rank's share of the
        minibatch in micro-batches. A grad_accum given in the config must be that number (or the default 1)."""
        per_rank = self.rollouts_per_minibatch_per_rank(learner)
        if per_rank is None or per_rank % learner.micro_batch_size:
            algo, gen = self.algorithm, self.generator
            raise ConfigError(
                f"{key}: a step makes algorithm.prompts_per_step={algo.prompts_per_step} x "
                f"generator.samples_per_prompt={gen.samples_per_prompt} = {self.rollouts_per_step} rollouts, split "
                f"into algorithm.num_minibatches={algo.num_minibatches} minibatches over "
                f"{key}.num_ranks={learner.num_ranks} ranks; each rank's share must divide evenly into "
                f"micro-batches of {key}.micro_batch_size={learner.micro_batch_size}")
        derived = per_rank // learner.micro_batch_size
        if learner.grad_accum not in (1, derived):
            raise ConfigError(f"{key}.grad_accum={learner.grad_accum}: RLHF derives it (a minibatch of "
                              f"{per_rank} rollouts per rank in micro-batches of {learner.micro_batch_size} is "
                              f"{derived}); leave it out or set {derived}")
        return replace(learner, grad_accum=derived)

    @property
    def needs_reference(self) -> bool:
        """Whether the run has a reference role: not when the KL penalty has no weight (kl_coef 0, fixed), as
        in DAPO-style runs; the step then logs no KL."""
        return self.algorithm.kl_coef > 0 or self.algorithm.kl_controller == "adaptive"

    @property
    def rollouts_per_step(self) -> int:
        return self.algorithm.prompts_per_step * self.generator.samples_per_prompt

    def rollouts_per_minibatch_per_rank(self, learner: LearnerConfig) -> Optional[int]:
        parts = self.algorithm.num_minibatches * learner.num_ranks
        return self.rollouts_per_step // parts if self.rollouts_per_step % parts == 0 else None


@dataclass(frozen=True)
class PipelineConfig:
    """SFT -> reward model -> RLHF (or SFT -> DPO), each stage's output feeding the next, one run directory per
    stage."""

    sft: SFTConfig = doc("The SFT stage; its model becomes the RLHF (or DPO) policy and reference.")
    mode: Literal["rm+rlhf", "dpo"] = doc(
        "rm+rlhf: SFT -> reward model (optional) -> RLHF; dpo: SFT -> DPO on the feedback directly. The sections "
        "of the other mode may stay in the file; they are not run.", "rm+rlhf")
    rlhf: Optional[RLHFConfig] = doc("The RLHF stage (mode rm+rlhf, required there); policy.path (and reward.model, with "
                           "an rm stage) are filled in.", None)
    rm: Optional[RMConfig] = doc("The reward-model stage (mode rm+rlhf); null skips it (rule rewards only).", None)
    rm_from_sft: bool = doc("Start the reward model from the SFT model instead of rm.model.path.", False)
    dpo: Optional[DPOConfig] = doc("The DPO stage (mode dpo, required there); model.path is filled in with the SFT model, "
                         "which is also the reference unless dpo.reference.path is set.", None)

    def __post_init__(self):
        if self.mode == "dpo":
            if self.dpo is None:
                raise ConfigError("dpo: required with mode=dpo (at least dpo.data.train, the feedback file)")
            return
        if self.rlhf is None:
            raise ConfigError("rlhf: required with mode=rm+rlhf (at least rlhf.data.train); or set mode=dpo")
        if self.rm is None:  # with an rm stage, its model becomes rlhf.reward.model
            self.rlhf.reward.require_source()
