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


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise preference loss `-log σ(r_chosen - r_rejected - margin)` per pair.

    Bradley-Terry model as used for reward models by Ouyang et al. 2022 (InstructGPT); the optional margin
    (how strongly annotators preferred) follows Touvron et al. 2023 (Llama 2), Eq. 2.

    Args:
        chosen: [N] rewards of the preferred responses.
        rejected: [N] rewards of the other responses.
        margin: [N] or None (zeros).
    Returns:
        [N] per-pair losses.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def ranking_pairs(order: list[int]) -> list[tuple[int, int]]:
    """Every (better, worse) pair implied by a ranking given as candidate indices best -> worst.

    `[2, 0, 1]` -> `[(2, 0), (2, 1), (0, 1)]`: k candidates give k(k-1)/2 pairs.
    """
    return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]


def plackett_luce_loss(rewards_in_order: torch.Tensor) -> torch.Tensor:
    """Listwise ranking loss: negative log-likelihood of the whole ranking under Plackett-Luce.

    `-Σ_{j=0}^{k-2} [ r_j - log Σ_{l>=j} exp(r_l) ]`, rewards sorted best -> worst (Plackett 1975, Luce 1959;
    the reward-model form of Zhu et al. 2023, "Principled RLHF from pairwise or K-wise comparisons").

    Args:
        rewards_in_order: [k] rewards, best candidate first.
    Returns:
        scalar loss (k-1 terms; the last candidate's term is always 0).
    """
    # logcumsumexp from the end: log Σ_{l>=j} exp(r_l) for every j.
    tails = torch.logcumsumexp(rewards_in_order.flip(0), dim=0).flip(0)
    return -(rewards_in_order[:-1] - tails[:-1]).sum()


def rating_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error between the reward and a rating normalised to [0, 1], per rating.

    Args:
        predicted: [N] rewards.
        target: [N] normalised ratings.
    Returns:
        [N] per-rating losses.
    """
    return (predicted.float() - target.float()) ** 2
