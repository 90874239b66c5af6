"""The Arrow tables that travel between RLHF roles: prompts, rollouts, scores, experience.

One row per sample; per-token values are list columns, so ragged responses need no padding in transit, the
object store hands them to every consumer zero-copy, and any step's table can be written to Parquet as is.
Each producer puts its table into the object store once; consumers build tensors themselves.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import torch

from rlhf_ray.algorithms.masked import pad_sequences

# A conversation: [{role, content}, ...] (reward models re-render prompt messages + the response text).
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

PROMPT_SCHEMA = pa.schema([
    ("prompt_ids", pa.list_(pa.int32())),     # chat-rendered prompt with the generation prompt
    ("prompt_text", pa.string()),
    ("metadata", pa.string()),                # JSON: the row's other fields (task, input, reference, ...)
    ("prompt_messages", MESSAGES_TYPE),       # the messages that prompt_ids renders
])

ROLLOUT_SCHEMA = pa.schema([
    ("prompt_index", pa.int64()),             # row of the prompt table
    ("sample_index", pa.int32()),             # 0..n-1 among the samples of that prompt
    ("group", pa.int64()),                    # responses to the same prompt in this step share it
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),   # [T_i] generated tokens, the stop token (end of turn/eos) included
    ("rollout_logprobs", pa.list_(pa.float32())),  # [T_i] log p of each token under the generator's weights
    ("finish_reason", pa.string()),           # "stop" | "length"
    ("prompt_text", pa.string()),
    ("response_text", pa.string()),
    ("metadata", pa.string()),
    ("prompt_messages", MESSAGES_TYPE),
])

# The column a reward scorer adds, aligned with the rollout rows.
REWARD_SCHEMA = pa.schema([("score", pa.float32())])                          # sequence score (normalised)

# What the learners train on: rollouts + scores + advantages.
EXPERIENCE_SCHEMA = pa.schema([
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("rollout_logprobs", pa.list_(pa.float32())),
    ("old_logprobs", pa.list_(pa.float32())),  # the learner's own, before this step's updates (PPO's pi_old)
    ("ref_logprobs", pa.list_(pa.float32())),
    ("values", pa.list_(pa.float32())),       # [] when there is no critic
    ("advantages", pa.list_(pa.float32())),
    ("returns", pa.list_(pa.float32())),      # [] when there is no critic
    ("score", pa.float32()),
    ("group", pa.int64()),
    ("kl_coef", pa.float64()),                # the KL coefficient of this step (the loss uses it for KL in loss)
])


def response_tensor(column: Sequence[Sequence[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ragged list column as a right-padded [B, T_max] tensor (0 in the padding)."""
    return pad_sequences(column, 0, dtype=dtype)


def response_mask(response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, T_max] float mask, 1 on each response's real tokens."""
    return pad_sequences([[1] * len(r) for r in response_ids], 0, dtype=torch.float32)
