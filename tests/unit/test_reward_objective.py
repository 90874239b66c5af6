"""Preference collation and the reward objective on a hand-made table and a stand-in reward model.

The stand-in reads only the first token of each candidate: reward = w * first token id, so every reward and
every loss below can be worked out by hand.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from rlhf_ray.config import RewardLossConfig, RMConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.data.collate import PreferenceBatch, collate_preferences
from rlhf_ray.data.preference import PREFERENCE_SCHEMA
from rlhf_ray.roles.objectives import LossOutput, RewardObjective

PAD = 0
W = 0.5  # the stand-in's weight


def make_table() -> pa.Table:
    rows = [
        # pair: chosen starts with 3, rejected with 1; margin 0.5
        dict(kind="pair", sequences=[[3, 7], [1, 7, 7]], order=[0, 1], scores=[], margin=0.5, group=0,
             prompt_text="p0", responses=["a", "b"], metadata="{}"),
        # ranking of 3: candidate 1 best, then 2, then 0
        dict(kind="ranking", sequences=[[2], [4, 5], [1, 1, 1, 1]], order=[1, 2, 0], scores=[], margin=0.0,
             group=1, prompt_text="p1", responses=["c", "d", "e"], metadata="{}"),
        # rating normalised to 0.75
        dict(kind="rating", sequences=[[5, 9]], order=[0], scores=[0.75], margin=0.0, group=2,
             prompt_text="p2", responses=["f"], metadata="{}"),
    ]
    return pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA)


class FirstTokenReward(torch.nn.Module):
    """A deterministic reward model: reward = w * input_ids[:, 0], returned as `.logits` of shape [S, 1]."""

    def __init__(self, w: float = W):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.calls.append((input_ids, attention_mask))
        return SimpleNamespace(logits=(self.w * input_ids[:, :1].float()))


def bt(diff: float) -> float:
    """-log σ(diff)."""
    return math.log1p(math.exp(-diff))


def pl(rewards: list[float]) -> float:
    """Plackett-Luce NLL of rewards in order, best first."""
    return -sum(rewards[j] - math.log(sum(math.exp(r) for r in rewards[j:])) for j in range(len(rewards) - 1))


# Rewards with w = 0.5: pair [1.5, 0.5]; ranking [1.0, 2.0, 0.5]; rating [2.5].
PAIR_LOSS = bt(1.5 - 0.5 - 0.5)
# Ranking order [1, 2, 0]: pairs (1,2): 2 - 0.5; (1,0): 2 - 1; (2,0): 0.5 - 1 (wrong way round).
RANKING_PAIRWISE = (bt(1.5) + bt(1.0) + bt(-0.5)) / 3
RANKING_PL = pl([2.0, 0.5, 1.0]) / 2
RATING_LOSS = (2.5 - 0.75) ** 2
ACCURACY_SUM = 1.0 + 2 / 3


# --- collate_preferences -----------------------------------------------------------------------

def test_collate_flattens_candidates_with_offsets_and_right_padding():
    batch = collate_preferences(make_table(), [0, 1, 2], PAD)
    assert batch.offsets == [0, 2, 5, 6]
    assert batch.input_ids.tolist() == [[3, 7, 0, 0], [1, 7, 7, 0], [2, 0, 0, 0], [4, 5, 0, 0], [1, 1, 1, 1],
                                        [5, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0],
                                             [1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    assert batch.kinds == ["pair", "ranking", "rating"]
    assert batch.orders == [[0, 1], [1, 2, 0], [0]]
    assert batch.scores == [[], [], [0.75]]
    assert batch.margins == [0.5, 0.0, 0.0]


def test_collate_takes_the_rows_asked_for_in_that_order():
    batch = collate_preferences(make_table(), [2, 0], pad_id=9)
    assert batch.offsets == [0, 1, 3]
    assert batch.kinds == ["rating", "pair"]
    assert batch.input_ids.tolist() == [[5, 9, 9], [3, 7, 9], [1, 7, 7]]
    assert batch.attention_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1]]


def test_collate_of_no_rows_is_one_masked_dummy_sequence():
    batch = collate_preferences(make_table(), [], pad_id=9)
    assert batch.input_ids.tolist() == [[9, 9]]
    assert batch.offsets == [0] and batch.kinds == [] and batch.orders == [] and batch.margins == []


def test_preference_batch_to_keeps_the_judgements():
    batch = collate_preferences(make_table(), [0, 1, 2], PAD)
    moved = batch.to("cpu")
    assert isinstance(moved, PreferenceBatch)
    assert torch.equal(moved.input_ids, batch.input_ids)
    assert (moved.offsets, moved.kinds, moved.orders, moved.scores, moved.margins) == \
        (batch.offsets, batch.kinds, batch.orders, batch.scores, batch.margins)


# --- RewardObjective ---------------------------------------------------------------------------

def loss_of(rows, ranking_loss: str = "pairwise", w: float = W) -> tuple[LossOutput, FirstTokenReward]:
    model = FirstTokenReward(w)
    objective = RewardObjective(ranking_loss)
    return objective.loss(model, objective.micro_batch(make_table(), rows, PAD)), model


def test_reward_loss_is_the_hand_computed_sum_per_row():
    out, model = loss_of([0, 1, 2])
    assert out.loss_sum.item() == pytest.approx(PAIR_LOSS + RANKING_PAIRWISE + RATING_LOSS, rel=1e-6)
    assert out.count.item() == 3
    assert out.stats["accuracy"].item() == pytest.approx(ACCURACY_SUM)
    assert not out.stats["accuracy"].requires_grad
    assert len(model.calls) == 1  # one forward for every candidate of every row


def test_reward_loss_per_kind():
    assert loss_of([0])[0].loss_sum.item() == pytest.approx(PAIR_LOSS, rel=1e-6)
    assert loss_of([1])[0].loss_sum.item() == pytest.approx(RANKING_PAIRWISE, rel=1e-6)
    assert loss_of([2])[0].loss_sum.item() == pytest.approx(RATING_LOSS, rel=1e-6)
    assert loss_of([2])[0].stats["accuracy"].item() == 0.0  # ratings carry no pair accuracy


def test_reward_loss_plackett_luce_option_changes_only_ranking_rows():
    out, _ = loss_of([0, 1, 2], ranking_loss="plackett_luce")
    assert out.loss_sum.item() == pytest.approx(PAIR_LOSS + RANKING_PL + RATING_LOSS, rel=1e-6)
    assert out.count.item() == 3
    assert out.stats["accuracy"].item() == pytest.approx(ACCURACY_SUM)
    for row in (0, 2):
        assert loss_of([row], "plackett_luce")[0].loss_sum.item() == pytest.approx(loss_of([row])[0].loss_sum.item())


def test_reward_loss_is_the_sum_of_its_rows_losses():
    # The invariant that lets the learner split a batch over ranks and micro-batches.
    whole, whole_model = loss_of([0, 1, 2])
    parts = [loss_of([r]) for r in (0, 1, 2)]
    assert whole.loss_sum.item() == pytest.approx(sum(p.loss_sum.item() for p, _ in parts), rel=1e-6)
    assert whole.count.item() == sum(p.count.item() for p, _ in parts)
    assert whole.stats["accuracy"].item() == pytest.approx(sum(p.stats["accuracy"].item() for p, _ in parts))
    whole.loss_sum.backward()
    for p, model in parts:
        p.loss_sum.backward()
    torch.testing.assert_close(whole_model.w.grad, sum(model.w.grad for _, model in parts))


def test_reward_loss_gradient_matches_the_hand_derivative():
    out, model = loss_of([0, 2])
    out.loss_sum.backward()
    # pair: d/dw bt(w (3 - 1) - 0.5) = -σ(-(2w - 0.5)) * 2; rating: d/dw (5w - 0.75)^2 = 2 (5w - 0.75) * 5.
    sig = 1 / (1 + math.exp(2 * W - 0.5))
    assert model.w.grad.item() == pytest.approx(-2 * sig + 10 * (5 * W - 0.75), rel=1e-6)


def test_reward_score_returns_each_rows_rewards():
    model, objective = FirstTokenReward(), RewardObjective()
    batch = objective.micro_batch(make_table(), [0, 1, 2], PAD)
    assert objective.score(model, batch) == [[1.5, 0.5], [1.0, 2.0, 0.5], [2.5]]
    assert objective.count(batch) == 3
    assert objective.num_tokens(batch) == 2 + 3 + 1 + 2 + 4 + 2


def test_reward_rewards_are_float32_for_a_low_precision_model():
    model = FirstTokenReward().to(torch.bfloat16)
    objective = RewardObjective()
    assert objective.rewards(model, objective.micro_batch(make_table(), [0], PAD)).dtype == torch.float32


def test_reward_loss_of_an_empty_batch_is_zero_but_still_backpropagates():
    objective, model = RewardObjective(), FirstTokenReward()
    batch = objective.micro_batch(make_table(), [], PAD)
    out = objective.loss(model, batch)
    assert out.loss_sum.item() == 0.0 and out.loss_sum.requires_grad
    assert out.count.item() == 0 and out.stats["accuracy"].item() == 0.0
    assert objective.count(batch) == 0 and objective.num_tokens(batch) == 0
    out.loss_sum.backward()
    assert model.w.grad is not None and model.w.grad.item() == 0.0  # the dummy forward reached the weights


def test_reward_objective_rejects_an_unknown_ranking_loss():
    with pytest.raises(ValueError, match=r"'listnet'.*pairwise, plackett_luce"):
        RewardObjective("listnet")


def test_objective_from_config_passes_the_ranking_loss_and_the_config_rejects_unknown_names():
    objective = RewardObjective.of(RewardLossConfig(ranking_loss="plackett_luce"))
    assert isinstance(objective, RewardObjective) and objective.ranking_loss == "plackett_luce"
    with pytest.raises(ConfigError, match=r"loss.ranking_loss.*'pairwise', 'plackett_luce'.*'ppo'"):
        load_config(RMConfig, None, ["data.train=x.jsonl", "loss.ranking_loss=ppo"])
