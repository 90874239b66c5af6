"""Arrow rows -> padded tensors, made at the consumer (the learner), never in the driver."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import pyarrow as pa
import torch

from rlhf_ray.algorithms.masked import pad_sequences


@dataclass(frozen=True)
class TokenBatch:
    """A right-padded batch of token sequences."""

    input_ids: torch.Tensor       # [B, T] long, padded with pad_id
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    loss_mask: torch.Tensor       # [B, T] float, 1 on tokens that carry loss

    def to(self, device: str | torch.device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))


def collate_sft(table: pa.Table, rows: Sequence[int], pad_id: int) -> TokenBatch:
    """Rows `rows` of an SFT table (`input_ids`, `loss_mask` list columns) as a padded batch."""
    if not rows:  # a rank with nothing to do still joins ZeRO-3 collectives with a masked dummy row
        return TokenBatch(torch.full((1, 2), pad_id), torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2))
    part = table.take(list(rows))
    ids = part.column("input_ids").to_pylist()
    masks = part.column("loss_mask").to_pylist()
    input_ids = pad_sequences(ids, pad_id)
    attention = pad_sequences([[1] * len(s) for s in ids], 0)
    loss_mask = pad_sequences(masks, 0, dtype=torch.float32)
    return TokenBatch(input_ids, attention, loss_mask)


@dataclass(frozen=True)
class PreferenceBatch:
    """Feedback rows flattened to one padded batch of candidate sequences, with each row's judgement."""

    input_ids: torch.Tensor        # [S, T] every candidate of every row, right-padded
    attention_mask: torch.Tensor   # [S, T]
    offsets: list[int]             # row i's candidates are sequences offsets[i]:offsets[i+1]
    kinds: list[str]               # per row: "pair" | "ranking" | "rating"
    orders: list[list[int]]        # per row: candidate indices (within the row), best first
    scores: list[list[float]]      # per row: normalised rating for "rating" rows, else []
    margins: list[float]           # per row

    def to(self, device: str | torch.device) -> "PreferenceBatch":
        return PreferenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.offsets,
                               self.kinds, self.orders, self.scores, self.margins)


def collate_preferences(table: pa.Table, rows: Sequence[int], pad_id: int) -> PreferenceBatch:
    """Rows of a preference table (see `data.preference.PREFERENCE_SCHEMA`) as one flat padded batch.

    No rows gives one masked dummy sequence and no judgements (ranks with nothing to do still join ZeRO-3
    collectives).
    """
    if not rows:
        return PreferenceBatch(torch.full((1, 2), pad_id), torch.ones(1, 2, dtype=torch.long), [0], [], [], [], [])
    part = table.take(list(rows)).to_pydict()
    sequences = [seq for candidates in part["sequences"] for seq in candidates]
    offsets = [0]
    for candidates in part["sequences"]:
        offsets.append(offsets[-1] + len(candidates))
    return PreferenceBatch(
        input_ids=pad_sequences(sequences, pad_id),
        attention_mask=pad_sequences([[1] * len(s) for s in sequences], 0),
        offsets=offsets, kinds=part["kind"], orders=part["order"], scores=part["scores"],
        margins=[float(m) for m in part["margin"]],
    )


# The per-response-token columns of rollout/experience tables an RLBatch can carry.
TOKEN_FIELDS = ("old_logprobs", "advantages", "ref_logprobs", "values", "returns", "rollout_logprobs")


@dataclass(frozen=True)
class RLBatch:
    """Prompt + response sequences with per-response-token fields aligned to [B, T] (T = longest response).

    `response_index[b, t]` is the position in `input_ids[b]` whose logits predict response token t, so
    `next_token_logprobs(logits, input_ids).gather(1, response_index)` gives the response tokens' logprobs.
    A field is None when the batch was collated without it (bare rollouts carry none of them).
    """

    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    response_index: torch.Tensor  # [B, T] long
    mask: torch.Tensor            # [B, T] 1 on real response tokens
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] the policy's before this step's updates (pi_old)
    advantages: Optional[torch.Tensor] = None    # [B, T]
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T] the reference policy's
    values: Optional[torch.Tensor] = None        # [B, T] the critic's, before this step's updates
    returns: Optional[torch.Tensor] = None       # [B, T] value targets
    rollout_logprobs: Optional[torch.Tensor] = None  # [B, T] what the generator reported (sampling policy)
    kl_coef: float = 0.0          # the KL coefficient the experience was made with (KL in the loss)

    def present(self) -> tuple[str, ...]:
        """Names of the token fields this batch carries."""
        return tuple(f for f in TOKEN_FIELDS if getattr(self, f) is not None)

    def require(self, name: str) -> torch.Tensor:
        """Field `name`, or an error saying the table lacked it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the batch has no {name!r} column (collated from a table without it: the "
                             "objective needs experience rows, not bare rollouts)")
        return value

    def to(self, device: str | torch.device) -> "RLBatch":
        moved = {f: getattr(self, f).to(device) for f in self.present()}
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       response_index=self.response_index.to(device), mask=self.mask.to(device), **moved)


def collate_rl(table: pa.Table, rows: Sequence[int], pad_id: int, fields: Sequence[str] = ()) -> RLBatch:
    """Rows of a rollout/experience table (prompt_ids, response_ids, the `TOKEN_FIELDS` named in `fields`, and
    kl_coef when the table has it) as an RLBatch."""
    unknown = [f for f in fields if f not in TOKEN_FIELDS]
    if unknown:
        raise ValueError(f"collate_rl: unknown field(s) {unknown}; valid: {', '.join(TOKEN_FIELDS)}")
    if not rows:  # dummy row for ranks with nothing to do (ZeRO-3 collectives); mask 0
        return RLBatch(torch.full((1, 2), pad_id), torch.ones(1, 2, dtype=torch.long),
                       torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1),
                       **{f: torch.zeros(1, 1) for f in fields})
    part = table.take(list(rows)).select(["prompt_ids", "response_ids", *fields]).to_pydict()
    prompts, responses = part["prompt_ids"], part["response_ids"]
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(1, max(len(r) for r in responses))
    index = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        index[i, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
    kl_coef = float(table.column("kl_coef")[int(rows[0])].as_py()) if "kl_coef" in table.column_names else 0.0
    return RLBatch(
        input_ids=pad_sequences(sequences, pad_id),
        attention_mask=pad_sequences([[1] * len(s) for s in sequences], 0),
        response_index=index,
        mask=pad_sequences([[1] * len(r) for r in responses], 0, dtype=torch.float32)[:, :width],
        kl_coef=kl_coef,
        **{f: pad_sequences(part[f], 0, dtype=torch.float32)[:, :width] if part[f] else torch.zeros(0)
           for f in fields},
    )
