"""Training losses as pure torch functions: tensors in, tensors out.

Losses return a *sum* over the tokens (or sequences) they cover together with the count, never a mean:
the learner divides by the count of the whole global batch, so the gradient is the same however the batch
is split over ranks and gradient-accumulation micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position.

    Args:
        logits: [B, T, V] unnormalised scores.
        targets: [B, T] token ids.
    Returns:
        [B, T] log-probabilities, float32.
    """
    logits = logits.float()
    return torch.gather(F.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= 1.

    Args:
        logits: [B, T, V] model outputs for `input_ids`.
        input_ids: [B, T].
    Returns:
        [B, T-1]; entry t-1 scores token t.
    """
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor,
             loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of the response tokens, `-Σ log p(y | x, θ)`.

    Args:
        logits: [B, T, V] model outputs.
        input_ids: [B, T] prompt + response tokens.
        loss_mask: [B, T] 1 where the token is a response token to be predicted, 0 on prompt and padding.
    Returns:
        (loss_sum, num_tokens): scalar sum of the NLL over masked tokens, and the count of those tokens.
    """
    mask = loss_mask[:, 1:].to(torch.float32)
    nll = -next_token_logprobs(logits, input_ids)
    return (nll * mask).sum(), mask.sum()
