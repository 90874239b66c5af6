"""What a learner optimises: how it loads its model, makes micro-batches, and computes a loss.

One `Learner` implementation serves every stage; the objective is the only part that differs. Objectives
return sums and counts (see `algorithms.losses`), so the learner can normalise by the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import pyarrow as pa
import torch

from rlhf_ray.algorithms.losses import (
    bradley_terry_loss,
    plackett_luce_loss,
    ranking_pairs,
    rating_loss,
    sft_loss,
)
from rlhf_ray.config import ModelConfig
from rlhf_ray.data.collate import (
    PreferenceBatch,
    RLBatch,
    TokenBatch,
    collate_preferences,
    collate_rl,
    collate_sft,
)
from rlhf_ray.models.loading import load_causal_lm, load_reward_model, load_value_model


@dataclass(frozen=True)
class LossOutput:
    loss_sum: torch.Tensor   # scalar, differentiable
    count: torch.Tensor      # scalar: tokens (or sequences) the sum covers
    stats: dict[str, torch.Tensor]  # extra sums to report, each divided by the global count


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

    def loss(self, model: torch.nn.Module, batch: TokenBatch, **_: Any) -> LossOutput:
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

    def loss(self, model: torch.nn.Module, batch: PreferenceBatch, **_: Any) -> LossOutput:
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


def response_logprobs_and_logits(model: torch.nn.Module, batch: RLBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] log-probabilities of the response tokens, [B, L, V] logits) for an RLBatch."""
    from rlhf_ray.algorithms.losses import next_token_logprobs

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return next_token_logprobs(logits, batch.input_ids).gather(1, batch.response_index), logits


class PolicyObjective:
    """PPO-style clipped policy loss on experience rows, with optional entropy bonus and KL-in-loss.

    The advantage estimator (gae, grpo, rloo, reinforce++) only changes the `advantages` column; the loss is
    the same clipped surrogate for all (with one epoch and no stale data the ratio is 1 and it reduces to
    the plain policy gradient).
    """

    FIELDS = ("old_logprobs", "advantages", "ref_logprobs")

    def __init__(self, clip_eps: float = 0.2, dual_clip: float | None = None, aggregation: str = "token",
                 entropy_coef: float = 0.0, kl_in_loss: bool = False, kl_estimator: str = "k1"):
        self.clip_eps, self.dual_clip, self.aggregation = clip_eps, dual_clip, aggregation
        self.entropy_coef, self.kl_in_loss, self.kl_estimator = entropy_coef, kl_in_loss, kl_estimator

    def load_model(self, cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> torch.nn.Module:
        return load_causal_lm(cfg, dtype)

    def micro_batch(self, table: pa.Table, rows: Sequence[int], pad_id: int) -> RLBatch:
        # Experience rows carry FIELDS; bare rollouts (scored for pi_old) do not.
        return collate_rl(table, rows, pad_id, [f for f in self.FIELDS if f in table.column_names])

    def count(self, batch: RLBatch) -> int:
        if self.aggregation == "sequence":
            return int((batch.mask.sum(-1) > 0).sum().item())
        return int(batch.mask.sum().item())

    def num_tokens(self, batch: RLBatch) -> int:
        return int(batch.attention_mask.sum().item())

    def loss(self, model: torch.nn.Module, batch: RLBatch, kl_coef: float = 0.0) -> LossOutput:
        from rlhf_ray.algorithms.policy_loss import (
            aggregate,
            entropy_from_logits,
            kl_penalty_loss,
            ppo_policy_loss,
        )

        logprobs, logits = response_logprobs_and_logits(model, batch)
        f = batch.fields
        out = ppo_policy_loss(logprobs, f["old_logprobs"], f["advantages"], batch.mask, self.clip_eps,
                              self.dual_clip, self.aggregation)
        total = out.loss_sum
        entropy = entropy_from_logits(logits[:, :-1].detach() if self.entropy_coef == 0 else logits[:, :-1])
        entropy_sum, _ = aggregate(entropy.gather(1, batch.response_index), batch.mask, self.aggregation)
        if self.entropy_coef:
            total = total - self.entropy_coef * entropy_sum
        stats = {"clip_fraction": out.clip_fraction_sum.detach(), "approx_kl": out.approx_kl_sum.detach(),
                 "entropy": entropy_sum.detach(), "policy_loss": out.loss_sum.detach()}
        if self.kl_in_loss:
            kl_sum, _ = kl_penalty_loss(logprobs, f["ref_logprobs"], batch.mask, self.kl_estimator)
            total = total + kl_coef * kl_sum
            stats["kl_loss"] = kl_sum.detach()
        return LossOutput(total, torch.tensor(float(self.count(batch))), stats)

    def logprobs(self, model: torch.nn.Module, batch: RLBatch) -> list[list[float]]:
        logprobs, _ = response_logprobs_and_logits(model, batch)
        lengths = batch.mask.sum(-1).long().tolist()
        return [row[:n] for row, n in zip(logprobs.float().cpu().tolist(), lengths)]


class ValueObjective:
    """The critic: per-token values V(s_t) of the response tokens, clipped value loss against GAE returns."""

    FIELDS = ("values", "returns")

    def __init__(self, value_clip: float | None = 0.2):
        self.value_clip = value_clip

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

    def loss(self, model: torch.nn.Module, batch: RLBatch, **_: Any) -> LossOutput:
        from rlhf_ray.algorithms.policy_loss import value_loss

        values = self.predict(model, batch)
        loss_sum, count = value_loss(values, batch.fields["values"], batch.fields["returns"], batch.mask,
                                     self.value_clip)
        return LossOutput(loss_sum, count, {"value_loss": loss_sum.detach()})

    def values(self, model: torch.nn.Module, batch: RLBatch) -> list[list[float]]:
        values = self.predict(model, batch)
        lengths = batch.mask.sum(-1).long().tolist()
        return [row[:n] for row, n in zip(values.cpu().tolist(), lengths)]


OBJECTIVES: dict[str, type] = {"sft": SFTObjective, "reward": RewardObjective, "policy": PolicyObjective,
                               "value": ValueObjective}


def make_objective(name: str, **options: Any) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown learner objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**options)
