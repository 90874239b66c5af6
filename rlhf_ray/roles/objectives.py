"""What a learner optimises: how it loads its model, makes micro-batches, and computes a loss.

One `Learner` implementation serves every stage; the objective is the only part that differs. Objectives
return sums and counts (see `algorithms.losses`), so the learner can normalise by the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import pyarrow as pa
import torch

from rlhf_ray.algorithms.losses import sft_loss
from rlhf_ray.config import ModelConfig
from rlhf_ray.data.collate import TokenBatch, collate_sft
from rlhf_ray.models.loading import load_causal_lm


@dataclass(frozen=True)
class LossOutput:
    loss_sum: torch.Tensor   # scalar, differentiable
    count: torch.Tensor      # scalar: tokens (or sequences) the sum covers
    stats: dict[str, torch.Tensor]  # extra sums to report, each divided by the global count


class Objective(Protocol):
    def load_model(self, cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module: ...

    def micro_batch(self, table: pa.Table, rows: Sequence[int], pad_id: int) -> Any: ...

    def count(self, batch: Any) -> int: ...

    def num_tokens(self, batch: Any) -> int: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> LossOutput: ...


class SFTObjective:
    """Instruction tuning: next-token NLL on response tokens only."""

    def load_model(self, cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
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


OBJECTIVES: dict[str, type] = {"sft": SFTObjective}


def make_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown learner objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()
