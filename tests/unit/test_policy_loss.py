"""PPO, value and KL losses on hand-computed tensors, and the invariants: padding changes nothing, and sums
and counts over any split of the batch give the whole batch's loss (and gradient), for both aggregations."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.kl import kl_estimate
from rlhf_ray.algorithms.policy_loss import (
    AGGREGATIONS,
    entropy_from_logits,
    kl_penalty_loss,
    ppo_policy_loss,
    value_loss,
)

EPS = 0.2
# One token per case, old log-prob 0, so the new log-prob is log ρ.
#            ρ     A     loss = max(-Aρ, -A clip(ρ))          clipped term active?
CASES = [(1.1, 1.0, -1.1),                                    # inside the range
         (1.5, 1.0, -1.2),                                    # above 1 + ε, A > 0: capped      yes
         (0.5, 1.0, -0.5),                                    # below 1 - ε, A > 0: unclipped
         (0.5, -1.0, 0.8),                                    # below 1 - ε, A < 0: clipped     yes
         (1.5, -1.0, 1.5),                                    # above 1 + ε, A < 0: unclipped
         (5.0, -1.0, 5.0)]                                    # far above, A < 0: dual clip's case
RATIO = torch.tensor([[c[0] for c in CASES]])
ADV = torch.tensor([[c[1] for c in CASES]])
LOSS = torch.tensor([[c[2] for c in CASES]])
ONES = torch.ones_like(RATIO)


def test_ppo_clip_cases_by_hand():
    out = ppo_policy_loss(RATIO.log(), torch.zeros_like(RATIO), ADV, ONES, EPS, None, "token")
    torch.testing.assert_close(out.loss_sum, LOSS.sum())
    assert out.count.item() == 6 and out.token_count.item() == 6
    assert out.clip_fraction_sum.item() == 2
    k3 = sum(r - 1 - math.log(r) for r, _, _ in CASES)  # KL(π_old || π_θ) from tokens of π_old
    torch.testing.assert_close(out.approx_kl_sum, torch.tensor(k3))


def test_ppo_per_token_loss_by_hand():
    for (ratio, adv, loss) in CASES:
        out = ppo_policy_loss(torch.tensor([[math.log(ratio)]]), torch.zeros(1, 1), torch.tensor([[adv]]),
                              torch.ones(1, 1), EPS)
        assert out.loss_sum.item() == pytest.approx(loss)


def test_dual_clip_caps_only_negative_advantages():
    out = ppo_policy_loss(RATIO.log(), torch.zeros_like(RATIO), ADV, ONES, EPS, dual_clip=3.0)
    # only (5.0, -1): min(5, 3 · 1) = 3; (1.5, -1) stays 1.5 < 3; positive advantages untouched
    torch.testing.assert_close(out.loss_sum, LOSS.sum() - 5.0 + 3.0)
    big_positive = ppo_policy_loss(torch.tensor([[math.log(0.1)]]), torch.zeros(1, 1), torch.tensor([[10.0]]),
                                   torch.ones(1, 1), EPS, dual_clip=1.5)
    assert big_positive.loss_sum.item() == pytest.approx(-1.0)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(RATIO.log(), torch.zeros_like(RATIO), ADV, ONES, EPS, dual_clip=1.0)


def test_clipped_tokens_get_no_gradient():
    logprobs = RATIO.log().requires_grad_()
    ppo_policy_loss(logprobs, torch.zeros_like(RATIO), ADV, ONES, EPS, dual_clip=3.0).loss_sum.backward()
    # d(-Aρ)/d log π = -Aρ where the unclipped term is active; 0 where clipped or dual-clipped
    expected = torch.tensor([[-1.1, 0.0, -0.5, 0.0, 1.5, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_sequence_aggregation_by_hand():
    """Row 0: tokens with losses -1.1, -1.2 -> mean -1.15. Row 1: one token, 0.8. Row 2: empty, not counted."""
    logprobs = torch.log(torch.tensor([[1.1, 1.5], [0.5, 1.0], [1.0, 1.0]]))
    adv = torch.tensor([[1.0, 1.0], [-1.0, 9.0], [3.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    seq = ppo_policy_loss(logprobs, torch.zeros(3, 2), adv, mask, EPS, aggregation="sequence")
    torch.testing.assert_close(seq.loss_sum, torch.tensor(-1.15 + 0.8))
    assert seq.count.item() == 2 and seq.token_count.item() == 3
    tok = ppo_policy_loss(logprobs, torch.zeros(3, 2), adv, mask, EPS, aggregation="token")
    torch.testing.assert_close(tok.loss_sum, torch.tensor(-1.1 - 1.2 + 0.8))
    assert tok.count.item() == 3
    assert seq.clip_fraction_sum.item() == tok.clip_fraction_sum.item() == 2


def test_unknown_aggregation_lists_the_valid_ones():
    assert set(AGGREGATIONS) == {"token", "sequence", "constant"}
    with pytest.raises(ValueError, match="token, sequence, constant"):
        ppo_policy_loss(RATIO.log(), torch.zeros_like(RATIO), ADV, ONES, EPS, aggregation="batch")


def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.0, 1.0]])
    old = torch.tensor([[0.5, 2.0, 0.0, 0.5]])
    returns = torch.tensor([[2.0, 1.0, 0.3, 0.8]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # token 0: (1-2)² = 1 vs clipped 0.7: (0.7-2)² = 1.69 -> 1.69
    # token 1: 1; token 2: 0.09; token 3: (1-0.8)² = 0.04 vs clipped 0.7: 0.01 -> 0.04
    loss_sum, count = value_loss(values, old, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(loss_sum, torch.tensor(0.5 * (1.69 + 1 + 0.09 + 0.04)))
    assert count.item() == 4
    loss_sum, _ = value_loss(values, old, returns, mask, clip_eps=None)
    torch.testing.assert_close(loss_sum, torch.tensor(0.5 * (1 + 1 + 0.09 + 0.04)))


def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 7)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(7)))
    banned = torch.tensor([[[0.0, 0.0, float("-inf")], [5.0, float("-inf"), float("-inf")]]])
    torch.testing.assert_close(entropy_from_logits(banned), torch.tensor([[math.log(2), 0.0]]))
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(torch.bfloat16)
    p = torch.softmax(logits.float(), -1)
    got = entropy_from_logits(logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, -(p * p.log()).sum(-1))


def test_kl_penalty_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    total, count = kl_penalty_loss(logp, ref, mask, "k3")
    torch.testing.assert_close(total, torch.tensor(0.5 - 1 + math.log(2)))
    assert count.item() == 2
    total, _ = kl_penalty_loss(logp, ref, mask, "k1")
    torch.testing.assert_close(total, torch.tensor(math.log(2)))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty_loss(logp, ref, mask, "k9")


# -- invariants ------------------------------------------------------------------------------------------

def _batch(seed: int, batch: int = 8, width: int = 7):
    """Right-padded rows of lengths 0..width, with non-finite garbage on the padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=gen)
    lengths[3] = 0  # one empty response
    mask = (torch.arange(width) < lengths.unsqueeze(1)).float()
    old = -torch.rand(batch, width, generator=gen) * 3
    new = old + torch.randn(batch, width, generator=gen) * 0.3
    adv = torch.randn(batch, width, generator=gen)
    values, old_values, returns = (torch.randn(batch, width, generator=gen) for _ in range(3))
    real = mask.bool()

    def garbage(x, g):
        return torch.where(real, x, torch.full_like(x, g))

    return {"new": garbage(new, -float("inf")), "old": garbage(old, float("nan")), "adv": garbage(adv, 1e9),
            "values": garbage(values, float("inf")), "old_values": old_values, "returns": returns, "mask": mask,
            "lengths": lengths.tolist()}


def _losses(b, rows, width, aggregation):
    """(policy loss_sum, count, value loss_sum, kl sum) on `rows` of the batch cut to `width` columns."""
    index = torch.tensor(rows)

    def cut(x):
        return x[index, :width]

    out = ppo_policy_loss(cut(b["new"]), cut(b["old"]), cut(b["adv"]), cut(b["mask"]), EPS, 3.0, aggregation)
    v_sum, _ = value_loss(cut(b["values"]), cut(b["old_values"]), cut(b["returns"]), cut(b["mask"]), 0.2)
    kl_sum, _ = kl_penalty_loss(cut(b["new"]), cut(b["old"]), cut(b["mask"]), "k3")
    return out, v_sum, kl_sum


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_garbage_padding_changes_nothing_and_gives_finite_gradients(aggregation):
    b = _batch(0)
    b["new"].requires_grad_()
    whole, v_sum, kl_sum = _losses(b, list(range(8)), 7, aggregation)
    clean = {k: (torch.where(b["mask"].bool(), v.detach(), 0.0) if torch.is_tensor(v) else v) for k, v in b.items()}
    ref, v_ref, kl_ref = _losses(clean, list(range(8)), 7, aggregation)
    for got, want in zip(whole, ref, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(v_sum, v_ref)
    torch.testing.assert_close(kl_sum, kl_ref)
    assert all(torch.isfinite(x) for x in (*whole, v_sum, kl_sum))
    (whole.loss_sum + kl_sum).backward()
    assert torch.isfinite(b["new"].grad).all() and (b["new"].grad[b["mask"] == 0] == 0).all()


SPLITS = [
    [[0, 1, 2, 3, 4, 5, 6, 7]],
    [[0], [1], [2], [3], [4], [5], [6], [7]],
    [[0, 1, 2, 3], [4, 5, 6, 7]],
    [[7, 2], [0, 5, 3], [6], [1, 4]],
    [[3], [1, 6, 0, 2, 5, 7, 4]],
]


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("parts", SPLITS, ids=lambda s: "/".join(str(len(p)) for p in s))
def test_sums_over_any_split_equal_the_whole_batch(aggregation, seed, parts):
    """Ranks x micro-batches: each part is cut to its own longest row, sums and counts are added up, and the
    total over the total count is the whole batch's loss; the gradient of `part_sum / global_count`
    accumulated over the parts is the whole batch's gradient."""
    b = _batch(seed)
    new = b["new"].detach().clone().requires_grad_()
    b["new"] = new
    whole, v_whole, kl_whole = _losses(b, list(range(8)), 7, aggregation)
    (whole.loss_sum / whole.count).backward()
    whole_grad = new.grad.clone()
    new.grad = None

    totals = torch.zeros(6, dtype=torch.float64)
    for rows in parts:
        width = max(max(b["lengths"][r] for r in rows), 1)
        out, v_sum, kl_sum = _losses(b, rows, width, aggregation)
        (out.loss_sum / whole.count).backward()  # the learner divides by the global count
        totals += torch.stack([out.loss_sum, out.count, out.clip_fraction_sum, out.approx_kl_sum,
                               v_sum, kl_sum]).detach().double()
    want = torch.stack([whole.loss_sum, whole.count, whole.clip_fraction_sum, whole.approx_kl_sum,
                        v_whole, kl_whole]).detach().double()
    torch.testing.assert_close(totals, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new.grad, whole_grad, rtol=1e-6, atol=1e-7)


def test_the_two_aggregations_differ_when_lengths_differ():
    """Why the choice is a setting: token-mean weights long responses more than the sequence-mean does."""
    b = _batch(0)
    tok, _, _ = _losses(b, list(range(8)), 7, "token")
    seq, _, _ = _losses(b, list(range(8)), 7, "sequence")
    assert abs((tok.loss_sum / tok.count - seq.loss_sum / seq.count).item()) > 1e-3


def test_approx_kl_matches_the_k3_estimator():
    b = _batch(1)
    out, _, _ = _losses(b, list(range(8)), 7, "token")
    mask = b["mask"].bool()
    expected = kl_estimate(b["old"][mask], b["new"][mask], "k3").sum()
    torch.testing.assert_close(out.approx_kl_sum, expected)


def test_kl_penalty_loss_sequence_aggregation_by_hand():
    """Per-response token mean, summed over responses, counted in responses: like the policy term."""
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.4, 0.1, 0.1], [0.3, 0.3, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    total, count = kl_penalty_loss(logp, ref, mask, "k1", "sequence")
    torch.testing.assert_close(total, torch.tensor((math.log(2) + 0.0) / 2 + math.log(0.5)))
    assert count.item() == 2  # the empty response is not counted
    token_total, token_count = kl_penalty_loss(logp, ref, mask, "k1")
    torch.testing.assert_close(token_total, torch.tensor(math.log(2) + math.log(0.5)))
    assert token_count.item() == 3
