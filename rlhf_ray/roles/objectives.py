"""What a learner optimises: how it loads its model, makes micro-batches, and computes a loss.

One `Learner` implementation serves every stage; the objective is the only part that differs. Each stage
builds its objective from its config (`SFTObjective()`, `RewardObjective.of(cfg.loss)`,
`PolicyObjective.of(cfg)`, `ValueObjective.of(cfg)`) and hands the object to the learner group, which sends
it to every rank. Objectives return sums and counts (see `algorithms.losses`), so the learner can normalise
by the global batch; what a loss needs beyond its model comes in the batch (e.g. the experience's KL
coefficient), never as loose keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import pyarrow as pa
import torch

from rlhf_ray.algorithms.logprobs import DEFAULT_CHUNK_ELEMENTS
from rlhf_ray.algorithms.losses import (
    bradley_terry_loss,
    plackett_luce_loss,
    ranking_pairs,
    rating_loss,
    sft_loss,
)
from rlhf_ray.config import ModelConfig, RewardLossConfig, RLHFConfig
from rlhf_ray.data.collate import (
    PreferenceBatch,
    RLBatch,
    TokenBatch,
    collate_preferences,
    collate_rl,
    collate_sft,
)
from rlhf_ray.models.causal_lm import response_logprobs
from rlhf_ray.models.loading import load_causal_lm, load_reward_model, load_value_model


@dataclass(frozen=True)
class LossOutput:
    loss_sum: torch.Tensor   # scalar, differentiable
    count: torch.Tensor      # scalar: tokens (or sequences) the sum covers
    stats: dict[str, torch.Tensor]  # extra sums to report, each divided by the global count
    # Per-token statistics (e.g. clip fraction), each divided by the global `token_count`, whatever `count` is.
    token_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    token_count: Optional[torch.Tensor] = None  # scalar: real tokens; needed when token_stats is not empty
    max_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # reported as their maximum over the step


def accumulate(totals: dict[str, float], out: LossOutput) -> dict[str, float]:
    """Add one micro-batch's sums into `totals` (flat keys, so one all-reduce of the values sums them all)."""
    parts = {"loss": out.loss_sum, **{f"stat/{k}": v for k, v in out.stats.items()},
             **{f"token_stat/{k}": v for k, v in out.token_stats.items()}}
    if out.token_count is not None:
        parts["token_count"] = out.token_count
    for key, value in parts.items():
        totals[key] = totals.get(key, 0.0) + float(value.detach())
    for key, value in out.max_stats.items():
        totals[f"max_stat/{key}"] = max(totals.get(f"max_stat/{key}", float("-inf")), float(value.detach()))
    return totals


def step_metrics(totals: dict[str, float], count: float) -> dict[str, float]:
    """Metrics of a step from `accumulate`d totals summed over every rank: the loss and `stats` divided by the
    global `count` (tokens or sequences, by the objective), `token_stats` by the global token count."""
    tokens = max(totals.get("token_count", 0.0), 1.0)
    metrics = {"loss": totals.get("loss", 0.0) / max(count, 1.0)}
    for key, value in totals.items():
        if key.startswith("stat/"):
            metrics[key.removeprefix("stat/")] = value / max(count, 1.0)
        elif key.startswith("token_stat/"):
            metrics[key.removeprefix("token_stat/")] = value / tokens
        elif key.startswith("max_stat/"):
            metrics[key.removeprefix("max_stat/")] = value
    return metrics


class Objective(Protocol):
    def load_model(self, cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> torch.nn.Module: ...

    def micro_batch(self, table: pa.Table, rows: Sequence[int], pad_id: int) -> Any: ...

    def count(self, batch: Any) -> int: ...

    def num_tokens(self, batch: Any) -> int: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> LossOutput: ...


class SFTObjective:
    """Instruction tuning: next-token NLL on response tokens only."""

    def load_model(self, cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> torch.nn.Module:
        return load_causal_lm(cfg, dtype)

    def micro_batch(self, table: pa.Table, rows: Sequence[int], pad_id: int) -> TokenBatch:
        return collate_sft(table, rows, pad_id)

    def count(self, batch: TokenBatch) -> int:
        return int(batch.loss_mask[:, 1:].sum().item())

    def num_tokens(self, batch: TokenBatch) -> int:
        return int(batch.attention_mask.sum().item())

    def loss(self, model: torch.nn.Module, batch: TokenBatch) -> LossOutput:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss_sum, count = sft_loss(logits, batch.input_ids, batch.loss_mask)
        return LossOutput(loss_sum, count, {})


class RewardObjective:
    """Reward model: one scalar per (prompt, response), trained on pairs, rankings and ratings.

    Per feedback row: a pair gives the Bradley-Terry loss; a ranking the mean Bradley-Terry loss over all its
    ordered pairs (so a prompt with many responses weighs as much as one pair) or the Plackett-Luce loss over
    its k-1 choices; a rating the squared error to its normalised score. The count is the number of rows.
    """

    def __init__(self, ranking_loss: str = "pairwise"):
        if ranking_loss not in ("pairwise", "plackett_luce"):
            raise ValueError(f"unknown ranking loss {ranking_loss!r}; valid: pairwise, plackett_luce")
        self.ranking_loss = ranking_loss

    @classmethod
    def of(cls, cfg: RewardLossConfig) -> "RewardObjective":
        return cls(cfg.ranking_loss)

    def load_model(self, cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> torch.nn.Module:
        return load_reward_model(cfg, dtype, pad_token_id=tokenizer.pad_token_id)

    def micro_batch(self, table: pa.Table, rows: Sequence[int], pad_id: int) -> PreferenceBatch:
        return collate_preferences(table, rows, pad_id)

    def count(self, batch: PreferenceBatch) -> int:
        return len(batch.kinds)

    def num_tokens(self, batch: PreferenceBatch) -> int:
        return int(batch.attention_mask.sum().item()) if batch.kinds else 0

    def rewards(self, model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        """[S] float32 reward of every candidate sequence in the batch."""
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0].float()

    def score(self, model: torch.nn.Module, batch: PreferenceBatch) -> list[list[float]]:
        flat = self.rewards(model, batch).tolist()
        return [flat[batch.offsets[i]:batch.offsets[i + 1]] for i in range(len(batch.kinds))]

    def loss(self, model: torch.nn.Module, batch: PreferenceBatch) -> LossOutput:
        rewards = self.rewards(model, batch)
        total = rewards.sum() * 0.0  # keeps the graph (and ZeRO-3 hooks) alive for a row-less dummy batch
        correct = torch.zeros((), device=rewards.device)
        for i, kind in enumerate(batch.kinds):
            r = rewards[batch.offsets[i]:batch.offsets[i + 1]]
            order = batch.orders[i]
            if kind == "rating":
                target = torch.tensor(batch.scores[i][:1], device=r.device)
                total = total + rating_loss(r[:1], target).sum()
                continue
            pairs = ranking_pairs(order)
            better = r[[b for b, _ in pairs]]
            worse = r[[w for _, w in pairs]]
            correct = correct + (better > worse).float().mean()
            if kind == "ranking" and self.ranking_loss == "plackett_luce":
                total = total + plackett_luce_loss(r[order]) / (len(order) - 1)
            else:
                margin = torch.full_like(better, batch.margins[i])
                total = total + bradley_terry_loss(better, worse, margin).mean()
        count = torch.tensor(float(len(batch.kinds)), device=rewards.device)
        return LossOutput(total, count, {"accuracy": correct.detach()})


class PolicyObjective:
    """PPO-style clipped policy loss on experience rows, with optional entropy bonus and KL-in-loss.

    The advantage estimator (gae, grpo, dr_grpo, rloo, reinforce++) only changes the `advantages` column; the
    loss is the same clipped surrogate for all (with one epoch and no stale data the ratio is 1 and it reduces
    to the plain policy gradient), with its variants from config: asymmetric clip (DAPO), per-token or
    per-sequence ratio (GSPO), and token / sequence / constant (Dr. GRPO) aggregation.

    Log-probabilities are those of the sampling distribution, `log_softmax(logits / temperature)` (what the
    generator samples from and reports), computed at response positions only, a chunk at a time
    (`models.causal_lm.response_logprobs`). The entropy (of the same distribution) comes out of the same
    chunks at the cost of one exp per logit: it is always reported, and differentiated only when
    `entropy_coef` > 0. `clip_fraction`, `approx_kl` and `kl_loss` are per-token statistics: they are divided
    by the global token count whatever the loss aggregation.
    """

    FIELDS = ("old_logprobs", "advantages", "ref_logprobs", "rollout_logprobs")

    @classmethod
    def of(cls, cfg: RLHFConfig) -> "PolicyObjective":
        """The policy loss of an RLHF config. The learner scores tokens under the distribution vLLM sampled
        from (`scoring_temperature`)."""
        from rlhf_ray.algorithms.logprobs import scoring_temperature

        algo = cfg.algorithm
        return cls(clip_eps=algo.clip_eps, dual_clip=algo.dual_clip, aggregation=algo.loss_aggregation,
                   entropy_coef=algo.entropy_coef, kl_in_loss=algo.kl_in == "loss" and cfg.needs_reference,
                   kl_estimator=algo.kl_estimator,
                   temperature=scoring_temperature(cfg.generator.temperature),
                   rollout_is_cap=algo.rollout_is_cap if algo.uses_rollout_is else None,
                   single_update=algo.single_update, clip_eps_high=algo.clip_eps_high,
                   importance_ratio=algo.importance_ratio, max_tokens=cfg.generator.max_new_tokens)

    def __init__(self, clip_eps: float = 0.2, dual_clip: float | None = None, aggregation: str = "token",
                 entropy_coef: float = 0.0, kl_in_loss: bool = False, kl_estimator: str = "k1",
                 temperature: float = 1.0, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 rollout_is_cap: float | None = None, single_update: bool = False,
                 clip_eps_high: float | None = None, importance_ratio: str = "token",
                 max_tokens: int | None = None):
        """`rollout_is_cap`: weight each token by the truncated importance ratio pi_old / pi_rollout (None: off).
        `single_update`: the batch trains in one optimizer step, so pi_old is the training forward itself
        (detached) and experience rows need no old_logprobs. `clip_eps_high`, `importance_ratio`, `max_tokens`:
        see `policy_loss.ppo_policy_loss`."""
        if temperature <= 0:
            raise ValueError(f"policy temperature must be > 0 (score greedy rollouts at 1), got {temperature}")
        self.clip_eps, self.dual_clip, self.aggregation = clip_eps, dual_clip, aggregation
        self.entropy_coef, self.kl_in_loss, self.kl_estimator = entropy_coef, kl_in_loss, kl_estimator
        self.temperature, self.chunk_elements = temperature, chunk_elements
        self.rollout_is_cap, self.single_update = rollout_is_cap, single_update
        self.clip_eps_high, self.importance_ratio, self.max_tokens = clip_eps_high, importance_ratio, max_tokens

    def load_model(self, cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> torch.nn.Module:
        return load_causal_lm(cfg, dtype)

    def micro_batch(self, table: pa.Table, rows: Sequence[int], pad_id: int) -> RLBatch:
        # Experience rows carry FIELDS; bare rollouts (scored for pi_old) do not.
        return collate_rl(table, rows, pad_id, [f for f in self.FIELDS if f in table.column_names])

    def count(self, batch: RLBatch) -> int:
        if self.aggregation in ("sequence", "constant"):
            return int((batch.mask.sum(-1) > 0).sum().item())
        return int(batch.mask.sum().item())

    def num_tokens(self, batch: RLBatch) -> int:
        return int(batch.attention_mask.sum().item())

    def response_logprobs(self, model: torch.nn.Module, batch: RLBatch,
                          with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """([B, T] log p_T of the response tokens, [B, T] entropy of p_T or None), 0 on padding."""
        return response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_index, batch.mask,
                                 self.temperature, with_entropy, self.chunk_elements)

    def loss(self, model: torch.nn.Module, batch: RLBatch) -> LossOutput:
        """The clipped surrogate (+ entropy bonus, + `batch.kl_coef` x KL to the reference when kl_in_loss)."""
        from rlhf_ray.algorithms.policy_loss import (
            aggregate,
            kl_penalty_loss,
            ppo_policy_loss,
        )

        logprobs, entropy = self.response_logprobs(model, batch, with_entropy=True)
        old = logprobs.detach() if self.single_update else batch.require("old_logprobs")
        token_stats, max_stats, weights = self._rollout_stats(logprobs, old, batch)
        out = ppo_policy_loss(logprobs, old, batch.require("advantages"), batch.mask, self.clip_eps, self.dual_clip,
                              self.aggregation, is_weights=weights, clip_eps_high=self.clip_eps_high,
                              importance_ratio=self.importance_ratio, max_tokens=self.max_tokens)
        total = out.loss_sum
        entropy_sum, _ = aggregate(entropy if self.entropy_coef else entropy.detach(), batch.mask, self.aggregation,
                                   self.max_tokens)
        if self.entropy_coef:
            total = total - self.entropy_coef * entropy_sum
        stats = {"entropy": entropy_sum.detach(), "policy_loss": out.loss_sum.detach()}
        token_stats.update(clip_fraction=out.clip_fraction_sum.detach(), approx_kl=out.approx_kl_sum.detach())
        if self.kl_in_loss:
            ref = batch.require("ref_logprobs")
            kl_sum, _ = kl_penalty_loss(logprobs, ref, batch.mask, self.kl_estimator, self.aggregation,
                                        self.max_tokens)
            total = total + batch.kl_coef * kl_sum
            token_stats["kl_loss"] = kl_penalty_loss(logprobs.detach(), ref, batch.mask, self.kl_estimator)[0]
        return LossOutput(total, torch.tensor(float(self.count(batch))), stats, token_stats, out.token_count,
                          max_stats)

    def _rollout_stats(self, logprobs: torch.Tensor, old: torch.Tensor, batch: RLBatch
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """(token stats, max stats, importance weights or None) of the rollout policy against pi_old: the
        truncated importance weights when on, and (single_update: the training forward is pi_old, so no
        experience row carried it) the vLLM-vs-learner logprob gap."""
        from rlhf_ray.algorithms.policy_loss import truncated_is_weights

        token_stats: dict[str, torch.Tensor] = {}
        max_stats: dict[str, torch.Tensor] = {}
        weights = None
        if self.rollout_is_cap is not None:
            weights, ratio_sum, over = truncated_is_weights(old, batch.require("rollout_logprobs"), batch.mask,
                                                            self.rollout_is_cap)
            token_stats.update({"rollout_is/ratio": ratio_sum, "rollout_is/clipped_fraction": over})
        if self.single_update and batch.rollout_logprobs is not None:
            gap = (logprobs.detach().float() - batch.rollout_logprobs.float()).abs() * batch.mask
            token_stats["logprob_gap/mean"] = gap.sum()
            max_stats["logprob_gap/max"] = gap.max()
        return token_stats, max_stats, weights

    def logprobs(self, model: torch.nn.Module, batch: RLBatch) -> list[list[float]]:
        logprobs, _ = self.response_logprobs(model, batch)
        lengths = batch.mask.sum(-1).long().tolist()
        return [row[:n] for row, n in zip(logprobs.float().cpu().tolist(), lengths)]


class ValueObjective:
    """The critic: per-token values V(s_t) of the response tokens, clipped value loss against GAE returns."""

    FIELDS = ("values", "returns")

    def __init__(self, value_clip: float | None = 0.2):
        self.value_clip = value_clip

    @classmethod
    def of(cls, cfg: RLHFConfig) -> "ValueObjective":
        return cls(cfg.algorithm.value_clip)

    def load_model(self, cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> torch.nn.Module:
        return load_value_model(cfg, dtype)

    def micro_batch(self, table: pa.Table, rows: Sequence[int], pad_id: int) -> RLBatch:
        return collate_rl(table, rows, pad_id, self.FIELDS if "returns" in table.column_names else ())

    def count(self, batch: RLBatch) -> int:
        return int(batch.mask.sum().item())

    def num_tokens(self, batch: RLBatch) -> int:
        return int(batch.attention_mask.sum().item())

    def predict(self, model: torch.nn.Module, batch: RLBatch) -> torch.Tensor:
        """[B, T] value of the state before each response token."""
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., 0].float()
        return out.gather(1, batch.response_index)

    def loss(self, model: torch.nn.Module, batch: RLBatch) -> LossOutput:
        from rlhf_ray.algorithms.policy_loss import value_loss

        values = self.predict(model, batch)
        loss_sum, count = value_loss(values, batch.require("values"), batch.require("returns"), batch.mask,
                                     self.value_clip)
        return LossOutput(loss_sum, count, {"value_loss": loss_sum.detach()})

    def values(self, model: torch.nn.Module, batch: RLBatch) -> list[list[float]]:
        values = self.predict(model, batch)
        lengths = batch.mask.sum(-1).long().tolist()
        return [row[:n] for row, n in zip(values.cpu().tolist(), lengths)]

