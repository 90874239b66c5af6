"""Direct preference optimisation: the policy trained on preferences directly, no reward model, no sampling.

Every loss scores each candidate response y of a prompt x by one number s(y), then compares the scores of a
(better, worse) pair. `logp(y)` is Σ_t log π_θ(y_t | x, y_<t) over the response tokens, `ref(y)` the same under
the frozen reference policy (computed once before training), `|y|` the number of response tokens; ref: whether the
loss needs the reference policy.

| name    | paper                                          | ref | score s(y)       | loss of a pair, w beats l   |
|---------|------------------------------------------------|-----|------------------|-----------------------------|
| sigmoid | Rafailov et al. 2023, "Direct Preference       | yes | logp(y) - ref(y) | -log σ(β (s_w - s_l) - m)   |
|         | Optimization", Eq. 7; margin m: Amini et al.   |     |                  | label smoothing ε:          |
|         | 2024, "DPO with an Offset" (ODPO)              |     |                  | conservative DPO (Mitchell) |
| ipo     | Azar et al. 2023, "A General Theoretical       | yes | logp(y) - ref(y) | (s_w - s_l - 1 / (2β))²     |
|         | Paradigm to Understand Learning from Human     |     |                  |                             |
|         | Preferences", Eq. 17 (their τ is β here)       |     |                  |                             |
| simpo   | Meng et al. 2024, "SimPO: Simple Preference    | no  | logp(y) / |y|    | -log σ(β (s_w - s_l) - γ    |
|         | Optimization with a Reference-Free Reward",    |     |                  |        - m)                 |
|         | Eq. 6                                          |     |                  |                             |

A ranking of k candidates is either all k(k-1)/2 ordered pairs of it, each weighted 1 / (number of pairs) so
that one prompt weighs as one pair (as the reward model's ranking loss does), or, listwise, the Plackett-Luce
likelihood of the whole ranking under the implicit rewards β s(y) (Rafailov et al. 2023, appendix A.3).

The implicit reward β s(y) is what evaluation compares: held-out preference accuracy is the share of pairs
with β s(w) > β s(l), the margin the mean of β (s(w) - s(l)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_ray.algorithms.losses import plackett_luce_loss


def candidate_scores(logps: Tensor, ref_logps: Optional[Tensor], lengths: Tensor,
                     length_normalised: bool) -> Tensor:
    """s(y) of every candidate: `logp - ref` (DPO, IPO) or `logp / |y|` (SimPO, reference-free).

    Args:
        logps: [S] summed response-token logprobs under the policy.
        ref_logps: [S] the same under the reference policy; None when `length_normalised`.
        lengths: [S] response tokens per candidate (clamped to >= 1 when dividing).
        length_normalised: SimPO's average logprob instead of the log-ratio to the reference.
    Returns:
        [S] scores.
    """
    if length_normalised:
        return logps / lengths.to(logps.dtype).clamp(min=1.0)
    if ref_logps is None:
        raise ValueError("candidate_scores: the log-ratio to the reference needs ref_logps")
    return logps - ref_logps


def _smoothed_logsigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """`-(1-ε) log σ(z) - ε log σ(-z)`: the preference label is taken as flipped with probability ε."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def dpo_sigmoid_loss(chosen: Tensor, rejected: Tensor, beta: float, label_smoothing: float = 0.0,
                     margin: Optional[Tensor] = None) -> Tensor:
    """DPO: `-log σ(β (s_w - s_l) - m)` per pair, s = logp - ref (Rafailov et al. 2023, Eq. 7).

    The margin m (how strongly the pair was preferred) is ODPO's offset (Amini et al. 2024): the chosen answer
    must beat the rejected one by at least m in implicit reward. With label smoothing ε the loss is conservative
    DPO's `-(1-ε) log σ(z) - ε log σ(-z)` (Mitchell 2023, "A note on DPO with noisy preferences").

    Args:
        chosen: [P] s of the preferred responses.
        rejected: [P] s of the other responses.
        beta: β > 0, the strength of the implicit KL constraint.
        label_smoothing: ε in [0, 0.5).
        margin: [P] or None (zeros).
    Returns:
        [P] per-pair losses.
    """
    logits = beta * (chosen - rejected)
    if margin is not None:
        logits = logits - margin
    return _smoothed_logsigmoid_loss(logits, label_smoothing)


def ipo_loss(chosen: Tensor, rejected: Tensor, beta: float) -> Tensor:
    """IPO: `(s_w - s_l - 1/(2β))²` per pair, s = logp - ref (Azar et al. 2023, Eq. 17, their τ = β).

    A squared loss regresses the log-ratio gap to a finite target instead of pushing it to infinity, which is
    what keeps IPO from overfitting deterministic preferences. Sequence log-probabilities are summed as in the
    paper (TRL averages them per token instead).

    Args:
        chosen: [P] s of the preferred responses.
        rejected: [P] s of the other responses.
        beta: β > 0.
    Returns:
        [P] per-pair losses.
    """
    return (chosen - rejected - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen: Tensor, rejected: Tensor, beta: float, gamma: float, label_smoothing: float = 0.0,
               margin: Optional[Tensor] = None) -> Tensor:
    """SimPO: `-log σ(β (s_w - s_l) - γ - m)` per pair, s = logp / |y| (Meng et al. 2024, Eq. 6).

    Reference-free: the reward is the length-normalised log-likelihood itself, and the target margin γ asks the
    chosen answer to win by at least that much. A pair's own margin m adds to γ.

    Args:
        chosen: [P] average response-token logprob of the preferred responses.
        rejected: [P] the same of the other responses.
        beta: β > 0.
        gamma: γ >= 0, the target reward margin.
        label_smoothing: ε in [0, 0.5).
        margin: [P] or None (zeros).
    Returns:
        [P] per-pair losses.
    """
    logits = beta * (chosen - rejected) - gamma
    if margin is not None:
        logits = logits - margin
    return _smoothed_logsigmoid_loss(logits, label_smoothing)


def plackett_luce_dpo_loss(scores_in_order: Tensor, beta: float) -> Tensor:
    """Listwise DPO: the Plackett-Luce negative log-likelihood of a whole ranking under implicit rewards β s
    (Rafailov et al. 2023, appendix A.3): `-Σ_{j<k-1} [β s_j - log Σ_{l>=j} exp(β s_l)]`.

    Args:
        scores_in_order: [k] s of the candidates, best first.
        beta: β > 0.
    Returns:
        scalar loss (k-1 terms).
    """
    return plackett_luce_loss(beta * scores_in_order)


@dataclass(frozen=True)
class PairLoss:
    """One entry of `DPO_LOSSES`: how candidates are scored and how a pair of scores is penalised."""

    needs_reference: bool
    length_normalised: bool
    listwise: bool  # whether a ranking may be trained with the Plackett-Luce form
    # (chosen [P], rejected [P], margin [P], beta, label_smoothing, gamma) -> [P]
    pair: Callable[[Tensor, Tensor, Tensor, float, float, float], Tensor]


DPO_LOSSES: dict[str, PairLoss] = {
    "sigmoid": PairLoss(True, False, True,
                        lambda c, r, m, beta, eps, gamma: dpo_sigmoid_loss(c, r, beta, eps, m)),
    "ipo": PairLoss(True, False, False, lambda c, r, m, beta, eps, gamma: ipo_loss(c, r, beta)),
    "simpo": PairLoss(False, True, True,
                      lambda c, r, m, beta, eps, gamma: simpo_loss(c, r, beta, gamma, eps, m)),
}


def get_dpo_loss(name: str) -> PairLoss:
    if name not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {name!r}; valid: {', '.join(DPO_LOSSES)}")
    return DPO_LOSSES[name]


def row_loss(scores: Tensor, pairs: Sequence[Sequence[int]], listwise_order: Optional[Sequence[int]],
             loss: PairLoss, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
             margin: float = 0.0) -> Tensor:
    """The loss of one judged prompt, weighing as one pair however many candidates it has.

    Args:
        scores: [k] s of the prompt's candidates (`candidate_scores`).
        pairs: (better, worse) candidate indices, at least one; each pair's loss is weighted 1 / len(pairs).
        listwise_order: the full ranking, best first, to train listwise instead (Plackett-Luce, divided by its
            k-1 terms as the reward model's listwise loss is); None: pairwise.
        loss: a `DPO_LOSSES` entry.
        beta, label_smoothing, gamma: its parameters.
        margin: the pair's margin (0 for rankings and ratings).
    Returns:
        scalar loss.
    """
    if listwise_order is not None:
        return plackett_luce_dpo_loss(scores[list(listwise_order)], beta) / (len(listwise_order) - 1)
    better = scores[[b for b, _ in pairs]]
    worse = scores[[w for _, w in pairs]]
    margins = torch.full_like(better, margin)
    return loss.pair(better, worse, margins, beta, label_smoothing, gamma).mean()


def preference_accuracy(rewards: Tensor, pairs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """(share of `pairs` whose better candidate has the higher reward, ties counting one half; mean reward gap
    better - worse). Before training the implicit rewards of DPO are all 0 (policy = reference): every pair is
    a tie, accuracy 0.5.

    Args:
        rewards: [k] implicit rewards of one prompt's candidates.
        pairs: (better, worse) candidate indices, at least one.
    Returns:
        two scalars.
    """
    better = rewards[[b for b, _ in pairs]]
    worse = rewards[[w for _, w in pairs]]
    right = (better > worse).float() + 0.5 * (better == worse).float()
    return right.mean(), (better - worse).mean()
