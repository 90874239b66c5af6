"""Direct preference optimisation (DPO, IPO, SimPO): the policy trained on the reward model's feedback formats."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

from rlhf_ray.config.base import (
    EvalConfig,
    LearnerConfig,
    ModelConfig,
    PlacementConfig,
    RunConfig,
)
from rlhf_ray.config.supervised import RewardDataConfig
from rlhf_ray.config_loader import ConfigError, doc


@dataclass(frozen=True)
class DPOLossConfig:
    type: Literal["sigmoid", "ipo", "simpo"] = doc(
        "sigmoid: DPO (Rafailov et al. 2023); ipo: IPO's squared loss (Azar et al. 2023); simpo: SimPO, "
        "reference-free with length-normalised logprobs (Meng et al. 2024; no reference actors run).", "sigmoid")
    beta: float = doc("β: the implicit reward is β (logp - ref_logp) (simpo: β logp / length); larger keeps the "
                      "policy closer to the reference (sigmoid, ipo). SimPO's paper uses 2-10.", 0.1, gt=0.0)
    label_smoothing: float = doc("sigmoid, simpo: ε, the assumed share of flipped preference labels "
                                 "(conservative DPO); 0: off.", 0.0, ge=0.0, lt=0.5)
    simpo_gamma: float = doc("simpo: γ, the target margin of the implicit reward.", 0.5, ge=0.0)
    ranking: Literal["pairs", "listwise"] = doc(
        "Ranking rows: pairs = every ordered pair of the ranking, each weighted 1/(number of pairs) so that a "
        "prompt weighs as one pair; listwise = the Plackett-Luce likelihood of the whole ranking under the "
        "implicit rewards (sigmoid, simpo).", "pairs")

    def __post_init__(self):
        if self.type == "ipo" and self.ranking == "listwise":
            raise ConfigError("loss.ranking=listwise: IPO has no listwise form; use loss.ranking=pairs or "
                              "loss.type=sigmoid|simpo")
        if self.type == "ipo" and self.label_smoothing:
            raise ConfigError("loss.label_smoothing: IPO has no label smoothing; set it to 0 or use "
                              "loss.type=sigmoid|simpo")

    @property
    def needs_reference(self) -> bool:
        return self.type != "simpo"


@dataclass(frozen=True)
class DPOReferenceConfig:
    path: Optional[str] = doc("The reference policy; null uses model.path (the policy's start, usually the SFT "
                              "model).", None)
    num_actors: int = doc("Reference actors; the candidates are sharded across them. They run once, before "
                          "training (their summed logprobs become a column of the data), then stop.", 1, ge=1)
    placement: PlacementConfig = doc("What each reference actor reserves (gpus null: 1 on CUDA; they run before "
                                     "the learners start).", default_factory=PlacementConfig)
    micro_batch_size: int = doc("Sequences per forward pass.", 32, ge=1)

    @property
    def gpus_per_actor(self) -> float:
        """GPUs each reference actor reserves on CUDA."""
        return 1.0 if self.placement.gpus is None else self.placement.gpus


@dataclass(frozen=True)
class DPOConfig:
    """DPO: train the policy directly on preferences, ratings or rankings (no reward model, no sampling)."""

    model: ModelConfig = doc("The policy to train (usually the SFT model); also the reference unless "
                             "reference.path is set.", default_factory=ModelConfig)
    data: RewardDataConfig = doc("Feedback, in the reward model's formats. Ratings always become pairs per prompt "
                                 "(higher score chosen), whatever data.ratings_to_pairs says.",
                                 default_factory=RewardDataConfig)
    loss: DPOLossConfig = doc("The preference loss.", default_factory=DPOLossConfig)
    reference: DPOReferenceConfig = doc("Reference actors: summed response logprobs of every candidate, computed "
                                        "once before training (not used by simpo).",
                                        default_factory=DPOReferenceConfig)
    learner: LearnerConfig = doc("The DeepSpeed learner group; micro_batch_size counts feedback rows (each with "
                                 "all its candidates).", default_factory=LearnerConfig)
    run: RunConfig = doc("Run directory, length, logging, checkpoints.", default_factory=RunConfig)
    eval: EvalConfig = doc("Evaluation on held-out feedback: loss, implicit-reward preference accuracy and margin; "
                           "and greedy answers to up to eval.num_generate held-out prompts graded by eval.checker.",
                           default_factory=EvalConfig)

    def __post_init__(self):
        if not self.data.train:
            raise ConfigError("data.train: required; name a .jsonl/.json/.parquet file or a `datasets` name")
        if self.eval.max_new_tokens is None:
            raise ConfigError("eval.max_new_tokens: DPO needs a number (the longest greedy answer at evaluation)")

    @property
    def reference_model(self) -> ModelConfig:
        """The reference policy's model config: the policy's, with reference.path when given."""
        return replace(self.model, path=self.reference.path or self.model.path, gradient_checkpointing=False)
