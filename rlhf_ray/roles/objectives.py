"""What a learner optimises: how it loads its model, makes micro-batches, and computes a loss.

One `Learner` implementation serves every stage; the objective is the only part that differs. Objectives
return sums and counts (see `algorithms.losses`), so the learner can normalise by the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import pyarrow as pa
import torch

from rlhf_ray.algorithms.losses import (bradley_terry_loss, plackett_luce_loss, ranking_pairs, rating_loss,
                                        sft_loss)
from rlhf_ray.config import ModelConfig
from rlhf_ray.data.collate import PreferenceBatch, TokenBatch, collate_preferences, collate_sft
from rlhf_ray.models.loading import load_causal_lm, load_reward_model


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


OBJECTIVES: dict[str, type] = {"sft": SFTObjective, "reward": RewardObjective}


def make_objective(name: str, **options: Any) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown learner objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**options)
