"""DPO, IPO, SimPO and listwise DPO (`algorithms.dpo`) on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.dpo import (
    DPO_LOSSES,
    candidate_scores,
    dpo_sigmoid_loss,
    get_dpo_loss,
    ipo_loss,
    plackett_luce_dpo_loss,
    preference_accuracy,
    row_loss,
    simpo_loss,
)


def nls(x: float) -> float:
    """-log σ(x)."""
    return math.log1p(math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_candidate_scores_are_log_ratios_or_length_normalised_logprobs():
    logps, ref, lengths = t(-4.0, -6.0), t(-5.0, -5.0), torch.tensor([2, 4])
    assert candidate_scores(logps, ref, lengths, False).tolist() == [1.0, -1.0]
    assert candidate_scores(logps, None, lengths, True).tolist() == [-2.0, -1.5]
    # an empty response counts as one token, not a division by zero
    assert candidate_scores(t(-3.0), None, torch.tensor([0]), True).tolist() == [-3.0]
    with pytest.raises(ValueError, match="ref_logps"):
        candidate_scores(logps, None, lengths, False)


def test_dpo_sigmoid_loss_by_hand():
    # s_w = 1.0, s_l = -1.0, beta 0.5 -> logits 1.0; second pair s_w = 0, s_l = 2 -> logits -1.0
    chosen, rejected = t(1.0, 0.0), t(-1.0, 2.0)
    assert dpo_sigmoid_loss(chosen, rejected, 0.5).tolist() == pytest.approx([nls(1.0), nls(-1.0)])
    # the pair's margin is subtracted from the logits (ODPO)
    assert dpo_sigmoid_loss(chosen, rejected, 0.5, margin=t(0.25, 0.0)).tolist() == \
        pytest.approx([nls(0.75), nls(-1.0)])
    # label smoothing 0.1: 0.9 * -log σ(z) + 0.1 * -log σ(-z)
    assert dpo_sigmoid_loss(chosen, rejected, 0.5, label_smoothing=0.1).tolist() == \
        pytest.approx([0.9 * nls(1.0) + 0.1 * nls(-1.0), 0.9 * nls(-1.0) + 0.1 * nls(1.0)])


def test_dpo_at_the_reference_is_log_2_and_its_gradient_favours_the_chosen():
    chosen, rejected = t(0.0).requires_grad_(), t(0.0).requires_grad_()
    loss = dpo_sigmoid_loss(chosen, rejected, 0.1)
    assert loss.item() == pytest.approx(math.log(2))
    loss.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)  # β σ(0)


def test_ipo_loss_by_hand():
    # beta 0.25 -> target gap 1 / (2 * 0.25) = 2
    assert ipo_loss(t(1.0, 3.0), t(-1.0, 0.0), 0.25).tolist() == pytest.approx([0.0, 1.0])
    assert ipo_loss(t(0.0), t(0.0), 0.5).tolist() == pytest.approx([1.0])  # (0 - 1)^2


def test_simpo_loss_by_hand():
    # average logprobs -0.5 vs -1.5, beta 2, gamma 0.5: logits 2 * 1.0 - 0.5 = 1.5
    assert simpo_loss(t(-0.5), t(-1.5), 2.0, 0.5).tolist() == pytest.approx([nls(1.5)])
    assert simpo_loss(t(-0.5), t(-1.5), 2.0, 0.5, margin=t(1.0)).tolist() == pytest.approx([nls(0.5)])
    assert simpo_loss(t(-0.5), t(-1.5), 2.0, 0.5, label_smoothing=0.2).tolist() == \
        pytest.approx([0.8 * nls(1.5) + 0.2 * nls(-1.5)])


def test_listwise_dpo_is_plackett_luce_of_the_implicit_rewards():
    scores = t(1.0, 0.0, -2.0)  # best first; beta 0.5 -> rewards 0.5, 0, -1
    r = [0.5, 0.0, -1.0]
    expected = -sum(r[j] - math.log(sum(math.exp(x) for x in r[j:])) for j in range(2))
    assert plackett_luce_dpo_loss(scores, 0.5).item() == pytest.approx(expected)
    # two candidates: exactly the DPO sigmoid loss of the pair
    assert plackett_luce_dpo_loss(t(1.0, -1.0), 0.5).item() == pytest.approx(nls(1.0))


def test_the_table_names_every_loss_and_rejects_others():
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "simpo"}
    assert DPO_LOSSES["simpo"].length_normalised and not DPO_LOSSES["simpo"].needs_reference
    assert DPO_LOSSES["sigmoid"].needs_reference and not DPO_LOSSES["ipo"].listwise
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'; valid: sigmoid, ipo, simpo"):
        get_dpo_loss("kto")


def test_row_loss_weights_the_pairs_of_one_prompt_equally():
    # ranking [2, 0, 1] of scores [1, 0, 3]: pairs (2,0): 3-1, (2,1): 3-0, (0,1): 1-0; beta 1
    scores = t(1.0, 0.0, 3.0)
    pairs = [(2, 0), (2, 1), (0, 1)]
    got = row_loss(scores, pairs, None, DPO_LOSSES["sigmoid"], beta=1.0)
    assert got.item() == pytest.approx((nls(2.0) + nls(3.0) + nls(1.0)) / 3)
    # listwise: Plackett-Luce over the ranking, divided by its k-1 = 2 terms
    listwise = row_loss(scores, pairs, [2, 0, 1], DPO_LOSSES["sigmoid"], beta=1.0)
    assert listwise.item() == pytest.approx(plackett_luce_dpo_loss(t(3.0, 1.0, 0.0), 1.0).item() / 2)
    # a pair row with a margin; IPO ignores margins
    assert row_loss(t(1.0, -1.0), [(0, 1)], None, DPO_LOSSES["sigmoid"], 0.5, margin=0.5).item() == \
        pytest.approx(nls(0.5))
    assert row_loss(t(1.0, -1.0), [(0, 1)], None, DPO_LOSSES["ipo"], 0.5, margin=9.0).item() == pytest.approx(1.0)


def test_preference_accuracy_counts_ties_as_half():
    acc, gap = preference_accuracy(t(0.5, 0.0, 0.0), [(0, 1), (1, 2), (2, 0)])
    assert acc.item() == pytest.approx((1 + 0.5 + 0) / 3)
    assert gap.item() == pytest.approx((0.5 + 0.0 - 0.5) / 3)
