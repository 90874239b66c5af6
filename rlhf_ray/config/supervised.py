"""The supervised stages: instruction tuning (SFT) and the reward model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from rlhf_ray.config.base import EvalConfig, LearnerConfig, ModelConfig, RunConfig
from rlhf_ray.config_loader import ConfigError, doc


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
class SFTConfig:
    """Instruction tuning: cross-entropy on the response tokens only."""

    model: ModelConfig = doc("The model to fine-tune.", default_factory=ModelConfig)
    data: DataConfig = doc("Instruction data.", default_factory=DataConfig)
    learner: LearnerConfig = doc("The DeepSpeed learner group.", default_factory=LearnerConfig)
    run: RunConfig = doc("Run directory, length, logging, checkpoints.", default_factory=RunConfig)
    eval: EvalConfig = doc("Evaluation after training (and every run.eval_every steps): held-out loss, and "
                           "greedy answers graded by eval.checker.", default_factory=EvalConfig)

    def __post_init__(self):
        if not self.data.train:
            raise ConfigError("data.train: required; name a .jsonl/.json/.parquet file or a `datasets` name")


@dataclass(frozen=True)
class RewardLossConfig:
    ranking_loss: Literal["pairwise", "plackett_luce"] = doc(
        "Loss for ranking rows: pairwise = mean Bradley-Terry loss over all ordered pairs of the ranking; "
        "plackett_luce = the listwise likelihood of the whole ranking.", "pairwise")


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
    eval: EvalConfig = doc("Evaluation on held-out feedback (at_start and num_print; the generation keys are "
                           "ignored).", default_factory=lambda: EvalConfig(num_print=3))

    def __post_init__(self):
        if not self.data.train:
            raise ConfigError("data.train: required; name a .jsonl/.json/.parquet file or a `datasets` name")
