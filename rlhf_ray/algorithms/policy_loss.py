"""RL training losses: PPO's clipped policy surrogate, the clipped value loss, the KL-in-loss penalty.

As in `losses.py`, each returns a *sum* and a *count*, never a mean: the learner divides by the count of the
whole global batch (all ranks, all micro-batches), so the gradient is the same however the batch is split.

How the policy loss is normalised is a choice, a table (`AGGREGATIONS`):

| aggregation | loss_sum                                        | count                | weighs                     |
|-------------|-------------------------------------------------|----------------------|----------------------------|
| token       | Σ over every real token                         | real tokens          | each token equally (DAPO)  |
| sequence    | Σ over responses of the response's token mean  | non-empty responses  | each response equally      |
|             |                                                 |                      | (GRPO, Shao et al. 2024)   |
| constant    | Σ over every real token / max_tokens            | non-empty responses  | each token equally, by a   |
|             | (max_tokens: generator.max_new_tokens)          |                      | constant (Dr. GRPO, Liu et |
|             |                                                 |                      | al. 2025, sec 3.1)         |

Dr. GRPO's `constant` removes the per-response 1/|o_i| of `sequence` (which favours long wrong answers and
short right ones) without making the normaliser depend on the batch's lengths as `token` does.

The importance ratio is a choice too (`ppo_policy_loss(importance_ratio=...)`):

| ratio    | ρ of token t of response i                         | paper                                        |
|----------|----------------------------------------------------|----------------------------------------------|
| token    | π_θ(y_t) / π_old(y_t)                              | PPO (Schulman et al. 2017)                   |
| sequence | exp(mean_t log(π_θ(y_t) / π_old(y_t))), the same   | GSPO (Zheng et al. 2025, "Group Sequence     |
|          | for every token of response i, clipped as one      | Policy Optimization", Eq. 5-7)               |

Clipping is asymmetric when `clip_eps_high` is given: ρ is clipped to [1 - ε, 1 + ε_high] (DAPO's
"clip-higher", Yu et al. 2025, sec 3.1: a wider upper bound lets low-probability tokens rise, against
entropy collapse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_ray.algorithms.kl import kl_estimate
from rlhf_ray.algorithms.masked import masked_count, masked_sum, zero_padding


def _token_aggregate(per_token: Tensor, mask: Tensor, max_tokens: int | None) -> tuple[Tensor, Tensor]:
    return masked_sum(per_token, mask), masked_count(mask)


def _sequence_aggregate(per_token: Tensor, mask: Tensor, max_tokens: int | None) -> tuple[Tensor, Tensor]:
    lengths = masked_count(mask, dim=1)  # [B]
    sums = masked_sum(per_token, mask, dim=1)
    # An empty response has no token mean: it adds 0 and is not counted.
    means = torch.where(lengths > 0, sums / lengths.clamp(min=1).to(sums.dtype), torch.zeros_like(sums))
    return means.sum(), (lengths > 0).to(torch.float32).sum()


def _constant_aggregate(per_token: Tensor, mask: Tensor, max_tokens: int | None) -> tuple[Tensor, Tensor]:
    if max_tokens is None or max_tokens < 1:
        raise ValueError(f"constant loss aggregation needs max_tokens >= 1 (generator.max_new_tokens), got "
                         f"{max_tokens}")
    # Empty responses (none are sampled; the driver's filler rows are) add nothing and are not counted.
    responses = (masked_count(mask, dim=1) > 0).to(torch.float32).sum()
    return masked_sum(per_token, mask) / max_tokens, responses


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], tuple[Tensor, Tensor]]] = {
    "token": _token_aggregate,
    "sequence": _sequence_aggregate,
    "constant": _constant_aggregate,
}


def aggregate(per_token: Tensor, mask: Tensor, aggregation: str, max_tokens: int | None = None
              ) -> tuple[Tensor, Tensor]:
    """Reduce a [B, T] per-token loss to (loss_sum, count) by the module table's `aggregation`; `max_tokens`
    is the constant normaliser of "constant" (unused by the others)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[aggregation](per_token, mask, max_tokens)


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalised sequence log-ratio (Zheng et al. 2025, Eq. 7), broadcast to every real token:
    `mean_t (log π_θ(y_t) - log π_old(y_t))` over response i's real tokens. Gradient flows through every
    token's term. An empty response gets 0.

    Args:
        log_ratio: [B, T] per-token log π_θ - log π_old, 0 on padding.
        mask: [B, T].
    Returns:
        [B, T], 0 on padding.
    """
    lengths = masked_count(mask, dim=1).clamp(min=1).to(log_ratio.dtype)
    per_sequence = masked_sum(log_ratio, mask, dim=1) / lengths
    return zero_padding(per_sequence.unsqueeze(1).expand(mask.shape), mask)


IMPORTANCE_RATIOS = ("token", "sequence")


class PolicyLossOutput(NamedTuple):
    """Sums and their normalisers; divide each sum by its count totalled over the global batch.

    loss_sum: scalar, normalised by `count` (tokens or responses, by the aggregation).
    count: scalar float32.
    clip_fraction_sum: scalar, number of real tokens whose clipped term was the active one (no gradient);
        normalised by `token_count`.
    approx_kl_sum: scalar, Σ over real tokens of the k3 estimate of KL(π_old || π_θ); normalised by
        `token_count`.
    token_count: scalar float32, the number of real tokens (equal to `count` for token aggregation).
    """

    loss_sum: Tensor
    count: Tensor
    clip_fraction_sum: Tensor
    approx_kl_sum: Tensor
    token_count: Tensor


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor,
                         cap: float) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated importance weights for rollouts sampled by another policy than the one that trains (stale
    weights one update old, or an inference engine whose numerics differ): `w = min(π_old / π_rollout, cap)`
    per token, no gradient (Ionides 2008, "Truncated importance sampling"; applied to the rollout/learner
    mismatch by Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training").

    Args:
        old_logprobs: [B, T] log π_old (the learner's policy before this step's update).
        rollout_logprobs: [B, T] log π_rollout (what the generator reported for the sampled tokens).
        mask: [B, T] 1 on real response tokens.
        cap: C >= 1.
    Returns:
        ([B, T] weights, 0 on padding; scalar Σ of the raw ratios over real tokens; scalar count of real tokens
        whose ratio exceeded the cap).
    """
    if cap < 1.0:
        raise ValueError(f"the importance-weight cap must be >= 1, got {cap}")
    with torch.no_grad():
        ratio = zero_padding((old_logprobs.float() - rollout_logprobs.float()).exp(), mask)
        weights = zero_padding(ratio.clamp(max=cap), mask)
        return weights, masked_sum(ratio, mask), masked_count(mask * (ratio > cap))


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float,
                    dual_clip: float | None = None, aggregation: str = "token",
                    is_weights: Tensor | None = None, clip_eps_high: float | None = None,
                    importance_ratio: str = "token", max_tokens: int | None = None) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", Eq. 7), as a
    loss to minimise, per token, with `ρ = exp(log π_θ - log π_old)` (or GSPO's sequence ratio, module table):

        L = max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε_high))      ε_high = ε unless clip_eps_high is given (DAPO)

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", Eq. 5): for A < 0 the
    loss above grows without bound in ρ, so it is capped at `dual_clip · (-A)`, dual_clip > 1:

        L = min(L, -dual_clip · A)   where A < 0

    Args:
        logprobs: [B, T] log π_θ(token), with gradient.
        old_logprobs: [B, T] log π_old(token), the policy that produced the rollouts.
        advantages: [B, T].
        mask: [B, T] 1 on real response tokens.
        clip_eps: ε, the lower clip (and the upper one unless clip_eps_high is given).
        dual_clip: the cap c > 1, or None for plain PPO.
        aggregation: "token" | "sequence" | "constant" (module table).
        is_weights: [B, T] per-token weights of the loss (`truncated_is_weights`), or None.
        clip_eps_high: ε_high, the upper clip, or None for ε.
        importance_ratio: "token" | "sequence" (module table).
        max_tokens: the constant normaliser of the "constant" aggregation.
    Returns:
        PolicyLossOutput (sums and counts).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (it caps the loss at c·|A| for A < 0), got {dual_clip}")
    if importance_ratio not in IMPORTANCE_RATIOS:
        raise ValueError(f"unknown importance ratio {importance_ratio!r}; valid: {', '.join(IMPORTANCE_RATIOS)}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = zero_padding(logprobs, mask) - zero_padding(old_logprobs.to(logprobs.dtype), mask)
    if importance_ratio == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, mask)
    advantages = zero_padding(advantages.to(log_ratio.dtype), mask)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    if is_weights is not None:
        loss = loss * is_weights.detach().to(loss.dtype)
    loss_sum, count = aggregate(loss, mask, aggregation, max_tokens)
    with torch.no_grad():
        clip_fraction_sum = masked_count(mask * (clipped > unclipped))
        approx_kl_sum = masked_sum(kl_estimate(old_logprobs.detach(), logprobs.detach(), "k3"), mask)
    return PolicyLossOutput(loss_sum, count, clip_fraction_sum, approx_kl_sum, masked_count(mask))


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_eps: float | None = None) -> tuple[Tensor, Tensor]:
    """Clipped value loss (the PPO2 baselines form; Schulman et al. 2017 implementation):

        L = ½ max((V - R)², (V_old + clip(V - V_old, -ε, ε) - R)²)

    or `½ (V - R)²` when clip_eps is None.

    Args:
        values: [B, T] V_φ(s_t), with gradient.
        old_values: [B, T] the critic's values when the rollouts were scored.
        returns: [B, T] regression targets R (e.g. GAE's A + V).
        mask: [B, T].
        clip_eps: ε, or None for no clipping.
    Returns:
        (loss_sum over real tokens, token count).
    """
    values = zero_padding(values, mask)
    old_values = zero_padding(old_values.to(values.dtype), mask)
    returns = zero_padding(returns.to(values.dtype), mask)
    loss = (values - returns) ** 2
    if clip_eps is not None:
        clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return masked_sum(0.5 * loss, mask), masked_count(mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution at every position, `H = logsumexp(z) - Σ_v softmax(z)_v z_v`,
    in float32. Logits of -inf (banned tokens) have probability 0 and add nothing.

    Args:
        logits: [B, T, V].
    Returns:
        [B, T] entropies (nats).
    """
    logits = logits.float()
    finite = torch.where(torch.isneginf(logits), torch.zeros((), device=logits.device), logits)
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * finite).sum(dim=-1)


def kl_penalty_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str,
                    aggregation: str = "token", max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """KL to the reference policy as a loss term (GRPO's way, Shao et al. 2024, Eq. 3, there with k3),
    instead of a penalty inside the reward: the per-token `kl_estimate(logprobs, ref_logprobs)` reduced by
    `aggregation` exactly as the policy term is (module table), so that `kl_coef` weighs the two alike: with
    "sequence", Σ over responses of the response's token mean, normalised by the number of responses (a
    token sum over that count would scale the coefficient by the response length).

    Args:
        logprobs: [B, T] log π_θ, with gradient.
        ref_logprobs: [B, T] log π_ref.
        mask: [B, T].
        estimator: "k1" | "k2" | "k3".
        aggregation: "token" | "sequence" | "constant".
        max_tokens: the constant normaliser of the "constant" aggregation.
    Returns:
        (kl_sum, count): token aggregation Σ over real tokens and the token count; the others as in the
        module table.
    """
    log_p = zero_padding(logprobs, mask)
    log_ref = zero_padding(ref_logprobs.to(log_p.dtype), mask)
    return aggregate(kl_estimate(log_p, log_ref, estimator), mask, aggregation, max_tokens)
