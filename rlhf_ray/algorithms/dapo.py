"""DAPO's parts that are neither an estimator nor a loss (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale"): overlong reward shaping (sec 3.4) and the group filter of dynamic
sampling (sec 3.2). Clip-higher is `policy_loss.ppo_policy_loss(clip_eps_high=...)`, the token-level loss
its "token" aggregation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths: Tensor, max_tokens: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment (Eq. 13), scaled by `penalty` (verl's overlong_penalty_factor):

        R_len(|y|) = 0                                         |y| <= L_max - L_buf
                   = -penalty · (|y| - (L_max - L_buf)) / L_buf  L_max - L_buf < |y| <= L_max
                   = -penalty                                   |y| > L_max

    It is added to the sequence score, so a truncated answer is not graded as if it were complete, and one
    that nears the limit is penalised a little before it gets there.

    Args:
        lengths: [B] response lengths in tokens (the stop token included).
        max_tokens: L_max (generator.max_new_tokens).
        buffer: L_buf, 1 <= L_buf <= L_max.
        penalty: the penalty at L_max, >= 0.
    Returns:
        [B] float32 penalties, each in [-penalty, 0].
    """
    if not 1 <= buffer <= max_tokens:
        raise ValueError(f"overlong buffer must be in [1, max_tokens={max_tokens}], got {buffer}")
    over = (lengths.to(torch.float32) - (max_tokens - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * over / buffer


def informative_groups(group_ids: Tensor, scores: Tensor) -> Tensor:
    """DAPO's dynamic-sampling filter (Eq. 11's constraint 0 < |{correct}| < G): which groups' scores are not
    all equal. A group whose scores are equal gets advantage 0 from every group-relative estimator, so it
    adds no policy gradient, only noise to the batch's normaliser. Equal means exactly equal: a rule reward's
    0/1 grades are, and any difference in score gives a non-zero advantage. A group of one is never
    informative.

    Args:
        group_ids: [B] long, responses to the same prompt share an id.
        scores: [B] sequence scores (after any shaping: what the advantage estimator sees).
    Returns:
        [B] bool, True on every response of an informative group.
    """
    if group_ids.shape != scores.shape or group_ids.dim() != 1:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} and scores {tuple(scores.shape)} must both be [B]")
    _, index = torch.unique(group_ids, return_inverse=True)
    n_groups = int(index.max()) + 1 if len(index) else 0
    high = torch.full((n_groups,), float("-inf")).scatter_reduce(0, index, scores.float(), "amax")
    low = torch.full((n_groups,), float("inf")).scatter_reduce(0, index, scores.float(), "amin")
    return (high > low)[index]
