"""Advantage estimators: one input type, one table.

Every estimator is `f(AdvantageInputs) -> (advantages [B, T], returns [B, T] or None)`; advantages and
returns are 0 on padding. Responses are right-padded: a response's real tokens come first in its row.

| name        | paper                                          | critic | advantage of token t of response i  |
|-------------|------------------------------------------------|--------|-------------------------------------|
| gae         | Schulman et al. 2016, "High-Dimensional        | yes    | Σ_l (γλ)^l δ_{t+l},                  |
|             | Continuous Control Using Generalized Advantage |        | δ_t = r_t + γ V_{t+1} - V_t          |
|             | Estimation"                                    |        |                                     |
| grpo        | Shao et al. 2024, "DeepSeekMath", sec 4.1      | no     | (R_i - mean_g R) / (std_g R + eps)  |
| dr_grpo     | Liu et al. 2025, "Understanding R1-Zero-Like   | no     | R_i - mean_g R                      |
|             | Training: A Critical Perspective", sec 3.1     |        |                                     |
| rloo        | Ahmadian et al. 2024, "Back to Basics:         | no     | R_i - mean of the other R_j in g    |
|             | Revisiting REINFORCE Style Optimization ..."   |        |                                     |
| reinforce++ | Hu 2025, "REINFORCE++"                         | no     | whiten_batch(Σ_{s>=t} γ^{s-t} r_s)   |

R_i = Σ_t r_t is response i's sequence return; a group g is the responses sampled for the same prompt.
Dr. GRPO drops GRPO's division by the group std (which up-weights prompts that are nearly always or never
solved); its other half, no per-response length normalisation, is the loss's `constant` aggregation
(`policy_loss.py`): the paper's method is `algorithm.advantage: dr_grpo` with `loss_aggregation: constant`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_ray.algorithms.masked import masked_sum, masked_whiten, zero_padding

# Added to the group std in GRPO so a group whose rewards are all equal gets advantage 0, not 0/0 (verl's value).
GRPO_STD_EPS = 1e-6


@dataclass(frozen=True)
class AdvantageInputs:
    """What every estimator reads.

    token_rewards: [B, T] reward per response token: the sequence score at the last real token, plus (when
        the KL penalty is in the reward) -kl_coef * kl_t at every token (see `token_rewards`).
    mask: [B, T] 1 on real response tokens, 0 on padding (right-padded).
    group_ids: [B] long; responses to the same prompt share an id.
    values: [B, T] critic values V(s_t) (gae only).
    gamma: discount γ.
    lam: GAE's λ.
    """

    token_rewards: Tensor
    mask: Tensor
    group_ids: Tensor
    values: Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self):
        shape = tuple(self.token_rewards.shape)
        if len(shape) != 2 or tuple(self.mask.shape) != shape:
            raise ValueError(f"token_rewards {shape} and mask {tuple(self.mask.shape)} must both be [B, T]")
        if tuple(self.group_ids.shape) != shape[:1]:
            raise ValueError(f"group_ids {tuple(self.group_ids.shape)} must be [B] = [{shape[0]}]")
        if self.values is not None and tuple(self.values.shape) != shape:
            raise ValueError(f"values {tuple(self.values.shape)} must match token_rewards {shape}")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must be in [0, 1], got gamma={self.gamma}, lam={self.lam}")


def token_rewards(scores: Tensor, kl: Tensor | None, kl_coef: float, mask: Tensor) -> Tensor:
    """Per-token rewards `r_t = -kl_coef · kl_t + score · [t is the last real token]` (Ziegler et al. 2019;
    Ouyang et al. 2022: the reward model scores the whole response, the KL penalty is paid per token).

    An empty response (mask all 0) has no last token, so its score is placed nowhere and its row is all 0.

    Args:
        scores: [B] sequence scores.
        kl: [B, T] per-token KL estimates, or None for no penalty in the reward.
        kl_coef: β.
        mask: [B, T].
    Returns:
        [B, T] rewards, 0 on padding.
    """
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)} must be [B] = [{mask.shape[0]}]")
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    if kl is not None:
        rewards = zero_padding(-kl_coef * kl.to(scores.dtype), mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # [B]; -1 for an empty response
    rows = torch.nonzero(last >= 0).squeeze(1)
    return rewards.index_put((rows, last[rows]), scores[rows], accumulate=True)


def _broadcast(per_sequence: Tensor, mask: Tensor) -> Tensor:
    """[B] -> [B, T]: the sequence's value on each of its real tokens, 0 on padding."""
    return zero_padding(per_sequence.unsqueeze(1).expand(mask.shape), mask)


def _sequence_returns(inp: AdvantageInputs) -> Tensor:
    """[B] R_i = Σ_t r_t over the real tokens of response i."""
    return masked_sum(inp.token_rewards, inp.mask, dim=1)


def _group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(index [B] of each response's group in 0..G-1, size [G] of each group)."""
    _, index, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return index, sizes


def _group_sum(x: Tensor, index: Tensor, n_groups: int) -> Tensor:
    """[B] -> [G] sums per group."""
    return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def _shift_left(x: Tensor) -> Tensor:
    """[B, T] -> [B, T]: column t holds x[:, t + 1]; the last column is 0."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


def _discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """[B, T] returns-to-go G_t = r_t + γ G_{t+1}, with G = 0 after the last real token."""
    rewards = zero_padding(rewards, mask)
    cont = _shift_left(mask.bool().to(rewards.dtype))
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * cont[:, t] * running
        out[:, t] = running
    return zero_padding(out, mask)


def gae(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), backwards over each response:
    `δ_t = r_t + γ V_{t+1} - V_t`, `A_t = δ_t + γλ A_{t+1}`, with V and A taken as 0 after the last real
    token (the response ends the episode). Returns `A + V`, the critic's regression target. Not whitened:
    the caller may whiten.

    Returns:
        advantages [B, T], returns [B, T]; both 0 on padding.
    """
    if inp.values is None:
        raise ValueError("gae needs critic values (AdvantageInputs.values); use a critic-free estimator "
                         "(grpo, dr_grpo, rloo, reinforce++) to train without one")
    rewards = zero_padding(inp.token_rewards, inp.mask)
    values = zero_padding(inp.values.to(rewards.dtype), inp.mask)
    # cont[:, t] = 0 once position t + 1 is padding: nothing is bootstrapped past the end of a response.
    cont = _shift_left(inp.mask.bool().to(rewards.dtype))
    next_values = _shift_left(values) * cont
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + inp.gamma * next_values[:, t] - values[:, t]
        running = delta + inp.gamma * inp.lam * cont[:, t] * running
        advantages[:, t] = running
    advantages = zero_padding(advantages, inp.mask)
    return advantages, zero_padding(advantages + values, inp.mask)


def grpo(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """Group-relative advantage (Shao et al. 2024, DeepSeekMath, outcome supervision):
    `A_i = (R_i - mean_g) / (std_g + eps)`, std the unbiased (n - 1) group std as `torch.std` computes it
    (TRL, verl), eps = GRPO_STD_EPS; broadcast to every real token of response i.

    A group of one response has no baseline, so its advantage is 0 (it teaches nothing, rather than NaN).
    An empty response still counts in its group, with R = 0.
    """
    returns = _sequence_returns(inp)
    index, sizes = _group_index(inp.group_ids)
    n = sizes.to(returns.dtype)
    mean = _group_sum(returns, index, len(sizes)) / n
    centred = returns - mean[index]
    var = _group_sum(centred ** 2, index, len(sizes)) / (n - 1).clamp(min=1)
    scores = centred / (var.sqrt()[index] + GRPO_STD_EPS)
    scores = torch.where(sizes[index] > 1, scores, torch.zeros_like(scores))
    return _broadcast(scores, inp.mask), None


def dr_grpo(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """Dr. GRPO's group-relative advantage (Liu et al. 2025, Eq. 3): `A_i = R_i - mean_g R`, GRPO without the
    std normalisation; broadcast to every real token of response i. A group of one response has advantage 0
    (its own mean is its return).
    """
    returns = _sequence_returns(inp)
    index, sizes = _group_index(inp.group_ids)
    mean = _group_sum(returns, index, len(sizes)) / sizes.to(returns.dtype)
    return _broadcast(returns - mean[index], inp.mask), None


def rloo(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024; Kool et al. 2019): the baseline of response i is the
    mean return of the *other* responses to the same prompt, `A_i = R_i - (Σ_g R - R_i) / (n - 1)`;
    broadcast to every real token. A group of one response has no other, so its advantage is 0.
    """
    returns = _sequence_returns(inp)
    index, sizes = _group_index(inp.group_ids)
    n = sizes[index].to(returns.dtype)
    others = (_group_sum(returns, index, len(sizes))[index] - returns) / (n - 1).clamp(min=1)
    scores = torch.where(n > 1, returns - others, torch.zeros_like(returns))
    return _broadcast(scores, inp.mask), None


def reinforce_pp(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """REINFORCE++ (Hu 2025): token returns-to-go `G_t = Σ_{s>=t} γ^{s-t} r_s`, then whitened over every
    real token of the whole batch (mean 0, unit variance), which stands in for a critic's baseline.
    """
    returns = _discounted_returns(inp.token_rewards, inp.mask, inp.gamma)
    return masked_whiten(returns, inp.mask), None


Estimator = Callable[[AdvantageInputs], tuple[Tensor, Tensor | None]]
ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {"gae": gae, "grpo": grpo, "rloo": rloo, "reinforce++": reinforce_pp,
                                              "dr_grpo": dr_grpo}
_CRITIC_ESTIMATORS = frozenset({"gae"})
# Baselines from the other responses to the same prompt: they need groups of two or more, and a group whose
# returns are all equal gets advantage 0 (what dynamic sampling filters out).
GROUP_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo"})


def _check_name(name: str) -> None:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")


def estimate_advantages(name: str, inp: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    """Run the estimator `name` from ADVANTAGE_ESTIMATORS on `inp`: (advantages [B, T], returns or None)."""
    _check_name(name)
    return ADVANTAGE_ESTIMATORS[name](inp)


def needs_critic(name: str) -> bool:
    """Whether the estimator reads critic values (and so the run needs a critic group): only gae."""
    _check_name(name)
    return name in _CRITIC_ESTIMATORS
