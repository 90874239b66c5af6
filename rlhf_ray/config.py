"""The configuration of every stage: frozen dataclasses, one per part, each field documented once.

Loaded from `configs/*.yaml` plus dotted overrides (`learner.lr=3e-4`) by `rlhf_ray.config_loader`; the
help text here is what `rlhf-ray <stage> --help` prints. Cross-field rules live in `__post_init__`.
"""

from __future__ import annotations

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


STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig}
