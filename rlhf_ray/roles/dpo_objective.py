"""The learner's objective for DPO, IPO and SimPO (`algorithms.dpo`): policy log-probabilities of each feedback
candidate's response tokens, compared within each judged prompt.

The reference policy's log-probabilities are not computed here: they arrive as a column of the table
(`data.dpo.REF_COLUMN`), made once before training by the reference actors, so each step runs one forward of
the policy only.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa
import torch

from rlhf_ray.algorithms.dpo import (
    candidate_scores,
    get_dpo_loss,
    preference_accuracy,
    row_loss,
)
from rlhf_ray.algorithms.logprobs import DEFAULT_CHUNK_ELEMENTS
from rlhf_ray.config import DPOLossConfig, ModelConfig
from rlhf_ray.data.dpo import REF_COLUMN, DPOBatch, collate_dpo
from rlhf_ray.models.causal_lm import response_logprobs
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.roles.objectives import LossOutput


class DPOObjective:
    """One loss per feedback row (a pair, a ranking, a prompt's ratings), each weighing as one pair: the count is
    the number of rows. Reports the implicit-reward preference accuracy and margin of the step's rows."""

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                 gamma: float = 0.0, ranking: str = "pairs", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        if ranking not in ("pairs", "listwise"):
            raise ValueError(f"unknown ranking mode {ranking!r}; valid: pairs, listwise")
        self.pair_loss = get_dpo_loss(loss_type)
        if ranking == "listwise" and not self.pair_loss.listwise:
            raise ValueError(f"the {loss_type} loss has no listwise form")
        self.loss_type, self.beta, self.label_smoothing, self.gamma = loss_type, beta, label_smoothing, gamma
        self.listwise, self.chunk_elements = ranking == "listwise", chunk_elements

    @classmethod
    def of(cls, cfg: DPOLossConfig) -> "DPOObjective":
        return cls(cfg.type, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma, cfg.ranking)

    @property
    def needs_reference(self) -> bool:
        return self.pair_loss.needs_reference

    def load_model(self, cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> torch.nn.Module:
        return load_causal_lm(cfg, dtype)

    def micro_batch(self, table: pa.Table, rows: Sequence[int], pad_id: int) -> DPOBatch:
        if self.needs_reference and REF_COLUMN not in table.column_names:
            raise ValueError(f"the {self.loss_type} loss needs the reference logprobs column {REF_COLUMN!r}; "
                             "the DPO stage adds it before training (stages.dpo.add_reference_logprobs)")
        return collate_dpo(table, rows, pad_id)

    def count(self, batch: DPOBatch) -> int:
        return len(batch.kinds)

    def num_tokens(self, batch: DPOBatch) -> int:
        return int(batch.attention_mask.sum().item()) if batch.kinds else 0

    def logps(self, model: torch.nn.Module, batch: DPOBatch) -> torch.Tensor:
        """[S] float32: summed log p of each candidate's response tokens (raw logprobs, temperature 1, as the
        reference actors compute them)."""
        logprobs, _ = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_index,
                                        batch.mask, 1.0, False, self.chunk_elements)
        return logprobs.sum(-1)

    def scores(self, logps: torch.Tensor, batch: DPOBatch) -> torch.Tensor:
        """[S] s of every candidate (`algorithms.dpo.candidate_scores`); the implicit reward is β s."""
        return candidate_scores(logps, batch.ref_logps if self.needs_reference else None, batch.lengths,
                                self.pair_loss.length_normalised)

    def loss(self, model: torch.nn.Module, batch: DPOBatch) -> LossOutput:
        logps = self.logps(model, batch)
        scores = self.scores(logps, batch)
        total = logps.sum() * 0.0  # keeps the graph (and ZeRO-3 hooks) alive for a row-less dummy batch
        correct = torch.zeros((), device=logps.device)
        margin = torch.zeros((), device=logps.device)
        for i, kind in enumerate(batch.kinds):
            s = scores[batch.offsets[i]:batch.offsets[i + 1]]
            order = batch.orders[i] if self.listwise and kind == "ranking" else None
            total = total + row_loss(s, batch.pairs[i], order, self.pair_loss, self.beta, self.label_smoothing,
                                     self.gamma, batch.margins[i])
            acc, gap = preference_accuracy(self.beta * s.detach(), batch.pairs[i])
            correct, margin = correct + acc, margin + gap
        count = torch.tensor(float(len(batch.kinds)), device=logps.device)
        return LossOutput(total, count, {"preference_accuracy": correct, "reward_margin": margin})

    def score(self, model: torch.nn.Module, batch: DPOBatch) -> list[list[float]]:
        """Per row, the policy's summed response logprob of each candidate (`Learner.score`)."""
        flat = self.logps(model, batch).float().cpu().tolist()
        return [flat[batch.offsets[i]:batch.offsets[i + 1]] for i in range(len(batch.kinds))]
