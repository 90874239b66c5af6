"""Policy and value objectives on a tiny deterministic stand-in model: the loss reduces to hand-computed sums."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from rlhf_ray.roles.objectives import (
    PolicyObjective,
    ValueObjective,
    accumulate,
    step_metrics,
)

PAD, VOCAB = 0, 13
PROMPTS = [[1, 2, 3], [4, 5], [6, 7], [8]]
RESPONSES = [[9, 10], [11, 12, 3], [], [5]]
ADVANTAGES = [[1.0, -2.0], [0.5, 0.25, 3.0], [], [-1.5]]
REF = [[-2.0, -3.0], [-2.5, -2.5, -2.5], [], [-1.0]]


class StandIn(torch.nn.Module):
    """Logits from the current token alone (an embedding): deterministic, differentiable, no attention."""

    def __init__(self, width: int = VOCAB, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, width, generator=generator))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])


def lists(rows) -> pa.Array:
    return pa.array(rows, pa.list_(pa.float32()))


def experience(old, advantages=ADVANTAGES, ref=REF, values=None, returns=None) -> pa.Table:
    ids = pa.list_(pa.int32())
    cols = {"prompt_ids": pa.array(PROMPTS, ids), "response_ids": pa.array(RESPONSES, ids),
            "old_logprobs": lists(old), "advantages": lists(advantages), "ref_logprobs": lists(ref)}
    if values is not None:
        cols.update(values=lists(values), returns=lists(returns))
    return pa.table(cols)


def direct(model: StandIn) -> tuple[list[list[float]], list[list[float]]]:
    """(logprobs, entropies) of every response token, by hand from the embedding table."""
    logp, ent = [], []
    for prompt, response in zip(PROMPTS, RESPONSES):
        seq = prompt + response
        dist = [torch.log_softmax(model.table[seq[len(prompt) + t - 1]].detach(), -1) for t in range(len(response))]
        logp.append([d[tok].item() for d, tok in zip(dist, response)])
        ent.append([-(d.exp() * d).sum().item() for d in dist])
    return logp, ent


ROWS = [0, 1, 2, 3]


@pytest.fixture
def model() -> StandIn:
    return StandIn()


@pytest.fixture
def batch(model):
    """A batch whose old_logprobs are the model's current ones, so the PPO ratio is exactly 1."""
    table = experience(old=[[0.0] * len(r) for r in RESPONSES])
    old = PolicyObjective().logprobs(model, PolicyObjective().micro_batch(table, ROWS, PAD))
    return PolicyObjective().micro_batch(experience(old=old), ROWS, PAD)


def real_tokens(rows):
    return [x for row in rows for x in row]


def test_policy_logprobs_match_a_direct_computation(model):
    table = experience(old=[[0.0] * len(r) for r in RESPONSES])
    got = PolicyObjective().logprobs(model, PolicyObjective().micro_batch(table, [3, 0, 2, 1], PAD))
    want, _ = direct(model)
    assert [len(g) for g in got] == [1, 2, 0, 3]
    for g, w in zip(got, [want[i] for i in (3, 0, 2, 1)]):
        assert g == pytest.approx(w, abs=1e-6)


def test_policy_loss_at_ratio_one_is_minus_the_advantage_sum(model, batch):
    out = PolicyObjective(clip_eps=0.2).loss(model, batch)
    assert out.loss_sum.item() == pytest.approx(-sum(real_tokens(ADVANTAGES)), abs=1e-5)
    assert out.count.item() == 6
    assert out.token_stats["clip_fraction"].item() == 0.0
    assert out.token_stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out.token_count.item() == 6
    assert out.stats["policy_loss"].item() == pytest.approx(out.loss_sum.item())
    assert "kl_loss" not in out.stats


def test_policy_loss_gradient_is_the_policy_gradient(model, batch):
    """At ratio 1, d loss = -Σ A_t d log π(a_t): compare with autograd through the direct log-probs."""
    PolicyObjective().loss(model, batch).loss_sum.backward()
    got = model.table.grad.clone()
    model.table.grad = None
    surrogate = torch.zeros(())
    for prompt, response, adv in zip(PROMPTS, RESPONSES, ADVANTAGES):
        seq = prompt + response
        for t, (tok, a) in enumerate(zip(response, adv)):
            surrogate = surrogate - a * torch.log_softmax(model.table[seq[len(prompt) + t - 1]], -1)[tok]
    surrogate.backward()
    assert torch.allclose(got, model.table.grad, atol=1e-6)


def test_sequence_aggregation_counts_non_empty_responses(model, batch):
    out = PolicyObjective(aggregation="sequence").loss(model, batch)
    means = [-sum(a) / len(a) for a in ADVANTAGES if a]
    assert out.loss_sum.item() == pytest.approx(sum(means), abs=1e-5)
    assert out.count.item() == 3
    assert PolicyObjective(aggregation="sequence").count(batch) == 3
    assert PolicyObjective(aggregation="token").count(batch) == 6


def test_kl_in_loss_adds_kl_coef_times_kl(model, batch):
    base = PolicyObjective().loss(model, batch).loss_sum.item()
    logp, _ = direct(model)
    kl = sum(p - r for p, r in zip(real_tokens(logp), real_tokens(REF)))  # k1
    out = PolicyObjective(kl_in_loss=True, kl_estimator="k1").loss(model, replace(batch, kl_coef=0.3))
    assert out.token_stats["kl_loss"].item() == pytest.approx(kl, abs=1e-5)
    assert out.loss_sum.item() == pytest.approx(base + 0.3 * kl, abs=1e-5)
    # The coefficient is ignored when the KL is in the reward.
    assert PolicyObjective().loss(model, replace(batch, kl_coef=0.3)).loss_sum.item() == pytest.approx(base, abs=1e-6)


def test_kl_in_loss_with_k3(model, batch):
    logp, _ = direct(model)
    log_r = torch.tensor(real_tokens(REF)) - torch.tensor(real_tokens(logp))
    kl = (log_r.exp() - log_r - 1).sum().item()
    out = PolicyObjective(kl_in_loss=True, kl_estimator="k3").loss(model, replace(batch, kl_coef=1.0))
    assert out.token_stats["kl_loss"].item() == pytest.approx(kl, abs=1e-5)


def test_entropy_coefficient_subtracts_the_entropy(model, batch):
    base = PolicyObjective().loss(model, batch)
    _, ent = direct(model)
    entropy = sum(real_tokens(ent))
    assert base.stats["entropy"].item() == pytest.approx(entropy, abs=1e-5)  # reported even when not trained
    out = PolicyObjective(entropy_coef=0.01).loss(model, batch)
    assert out.loss_sum.item() == pytest.approx(base.loss_sum.item() - 0.01 * entropy, abs=1e-5)
    seq = PolicyObjective(aggregation="sequence").loss(model, batch)
    assert seq.stats["entropy"].item() == pytest.approx(sum(sum(e) / len(e) for e in ent if e), abs=1e-5)


def test_clipping_stops_the_loss_when_the_ratio_moves_too_far(model, batch):
    """old = current - 1 means ratio = e > 1.2 on every token: positive advantages are clipped (no gradient)."""
    moved = experience(old=[[x - 1.0 for x in row] for row in direct(model)[0]])
    mb = PolicyObjective().micro_batch(moved, ROWS, PAD)
    out = PolicyObjective(clip_eps=0.2).loss(model, mb)
    e = torch.e
    want = sum(-a * (1.2 if a > 0 else e) for a in real_tokens(ADVANTAGES))
    assert out.loss_sum.item() == pytest.approx(want, abs=1e-4)
    assert out.token_stats["clip_fraction"].item() == sum(a > 0 for a in real_tokens(ADVANTAGES))


# -- the critic ----------------------------------------------------------------------------------------------

OLD_VALUES = [[0.0, 1.0], [0.5, -0.5, 0.0], [], [2.0]]
RETURNS = [[1.0, 1.0], [0.0, 0.0, 0.0], [], [1.0]]


@pytest.fixture
def critic() -> StandIn:
    return StandIn(width=1, seed=3)


def critic_batch():
    table = experience(old=[[0.0] * len(r) for r in RESPONSES], values=OLD_VALUES, returns=RETURNS)
    return ValueObjective().micro_batch(table, ROWS, PAD)


def hand_values(critic: StandIn) -> list[list[float]]:
    """V(state before response token t) = the critic's output at the position before it."""
    return [[critic.table[(p + r)[len(p) + t - 1], 0].item() for t in range(len(r))]
            for p, r in zip(PROMPTS, RESPONSES)]


def test_values_are_read_at_the_position_before_each_response_token(critic):
    got = ValueObjective().values(critic, critic_batch())
    for g, w in zip(got, hand_values(critic)):
        assert g == pytest.approx(w, abs=1e-6)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_against_hand_values(critic, clip):
    out = ValueObjective(value_clip=clip).loss(critic, critic_batch())
    want = 0.0
    for v, old, ret in zip(real_tokens(hand_values(critic)), real_tokens(OLD_VALUES), real_tokens(RETURNS)):
        loss = (v - ret) ** 2
        if clip is not None:
            loss = max(loss, (old + max(-clip, min(clip, v - old)) - ret) ** 2)
        want += 0.5 * loss
    assert out.loss_sum.item() == pytest.approx(want, abs=1e-5)
    assert out.count.item() == 6 and ValueObjective().count(critic_batch()) == 6
    assert out.stats["value_loss"].item() == pytest.approx(want, abs=1e-5)


def test_value_micro_batch_without_returns_has_no_fields():
    table = experience(old=[[0.0] * len(r) for r in RESPONSES])
    assert ValueObjective().micro_batch(table, ROWS, PAD).present() == ()


# -- normalisation of the step metrics, temperature ---------------------------------------------------------------

def test_sequence_aggregation_weighs_the_kl_term_like_the_policy_term(model, batch):
    base = PolicyObjective(aggregation="sequence").loss(model, batch).loss_sum.item()
    logp, _ = direct(model)
    per_response = [sum(p - r for p, r in zip(lp, rf)) / len(lp) for lp, rf in zip(logp, REF) if lp]  # k1 means
    out = PolicyObjective(aggregation="sequence", kl_in_loss=True).loss(model, replace(batch, kl_coef=0.3))
    assert out.loss_sum.item() == pytest.approx(base + 0.3 * sum(per_response), abs=1e-5)
    assert out.count.item() == 3
    # The logged kl_loss is a token statistic either way: Σ over tokens, divided by the token count.
    assert out.token_stats["kl_loss"].item() == pytest.approx(sum(real_tokens(logp)) - sum(real_tokens(REF)), abs=1e-5)
    assert out.token_count.item() == 6


def test_token_statistics_divide_by_tokens_and_clip_fraction_stays_at_most_one(model):
    """Every token clipped (old = current - 1, positive advantages): clip fraction is exactly 1 with sequence
    aggregation too (dividing the 6 clipped tokens by the 3 responses gave 2)."""
    moved = experience(old=[[x - 1.0 for x in row] for row in direct(model)[0]], advantages=[[1.0] * len(r)
                                                                                           for r in RESPONSES])
    objective = PolicyObjective(clip_eps=0.2, aggregation="sequence", kl_in_loss=True)
    totals: dict[str, float] = {}
    for rows in ([0, 1], [2, 3]):  # two micro-batches, summed as the learner does (one rank)
        mb = objective.micro_batch(moved, rows, PAD)
        accumulate(totals, objective.loss(model, replace(mb, kl_coef=0.1)))
    count = sum(objective.count(objective.micro_batch(moved, rows, PAD)) for rows in ([0, 1], [2, 3]))
    metrics = step_metrics(totals, count)
    assert count == 3 and totals["token_count"] == 6
    assert metrics["clip_fraction"] == 1.0
    assert metrics["approx_kl"] == pytest.approx(math.e - 1 - 1, abs=1e-5)  # k3 at log ratio 1 on every token
    assert metrics["kl_loss"] == pytest.approx(totals["token_stat/kl_loss"] / 6)
    assert metrics["loss"] == pytest.approx(totals["loss"] / 3) and metrics["entropy"] == totals["stat/entropy"] / 3


def test_step_metrics_of_a_value_objective_have_no_token_stats(critic):
    totals = accumulate({}, ValueObjective().loss(critic, critic_batch()))
    assert set(step_metrics(totals, 6)) == {"loss", "value_loss"}


def test_policy_logprobs_at_a_temperature(model):
    table = experience(old=[[0.0] * len(r) for r in RESPONSES])
    objective = PolicyObjective(temperature=0.7)
    got = objective.logprobs(model, objective.micro_batch(table, ROWS, PAD))
    for prompt, response, row in zip(PROMPTS, RESPONSES, got):
        seq = prompt + response
        want = [torch.log_softmax(model.table[seq[len(prompt) + t - 1]].detach() / 0.7, -1)[tok].item()
                for t, tok in enumerate(response)]
        assert row == pytest.approx(want, abs=1e-6)
    assert got != PolicyObjective().logprobs(model, objective.micro_batch(table, ROWS, PAD))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        PolicyObjective(temperature=0.0)
