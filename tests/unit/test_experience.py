"""Rollouts + scorer outputs -> experience: schema, advantages, the KL placement, the step statistics,
joining shard tables, and the Parquet dump."""

from __future__ import annotations

import json
import math
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlhf_ray.algorithms.advantages import (
    AdvantageInputs,
    estimate_advantages,
    token_rewards,
)
from rlhf_ray.algorithms.masked import masked_whiten
from rlhf_ray.rollout.experience import (
    ExperienceParams,
    build_experience,
    kl_rows,
    rows_in_order,
    write_rollouts,
)
from rlhf_ray.rollout.schema import EXPERIENCE_SCHEMA, ROLLOUT_SCHEMA

# Four rollouts in two groups; row 1 is an empty response, row 2 ran out of tokens.
PROMPTS = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
RESPONSES = [[10, 11, 12], [], [13, 14, 15, 16], [17]]
ROLLOUT_LP = [[-0.5, -1.0, -0.25], [], [-2.0, -0.5, -0.75, -1.5], [-0.125]]
OLD_LP = [[-0.5, -1.25, -0.25], [], [-2.0, -0.5, -1.0, -1.5], [-0.5]]      # gaps 0.25, 0.25, 0.375
REF_LP = [[-1.0, -1.0, -0.5], [], [-1.5, -0.5, -1.0, -2.0], [-0.25]]
VALUES = [[0.1, 0.2, 0.3], [], [0.0, -0.25, 0.5, 0.25], [0.75]]
SCORES = [1.0, 0.0, 0.5, -0.5]
TASK_SCORES = [0.5, 0.0, 0.25, 0.0]
FINISH = ["stop", "stop", "length", "stop"]
GROUPS = [0, 0, 1, 1]


def rollouts() -> pa.Table:
    n = len(RESPONSES)
    return pa.Table.from_pydict({
        "prompt_index": [0, 0, 1, 1], "sample_index": [0, 1, 0, 1], "group": GROUPS,
        "prompt_ids": PROMPTS, "response_ids": RESPONSES, "rollout_logprobs": ROLLOUT_LP,
        "finish_reason": FINISH, "prompt_text": [f"p{i}" for i in range(n)],
        "response_text": [f"r{i}" for i in range(n)], "metadata": [json.dumps({"i": i}) for i in range(n)],
        "prompt_messages": [[{"role": "user", "content": f"p{i}"}] for i in range(n)],
    }, schema=ROLLOUT_SCHEMA)


def rewards() -> pa.Table:
    return pa.table({"score": pa.array(SCORES, pa.float32()),
                     "score/task_score": pa.array(TASK_SCORES, pa.float32())})


def params(advantage: str = "grpo", **kw) -> ExperienceParams:
    base = {"advantage": advantage, "kl_coef": 0.1, "kl_estimator": "k1", "kl_in_reward": True, "gamma": 1.0,
            "lam": 0.95, "whiten_advantages": False}
    return ExperienceParams(**{**base, **kw})


def build(p: ExperienceParams, values=None):
    return build_experience(rollouts(), REF_LP, rewards(), OLD_LP, values, p)


def padded(rows: list[list[float]]) -> torch.Tensor:
    """Right-padded [4, 4] by hand (independent of the module's helpers)."""
    return torch.tensor([r + [0.0] * (4 - len(r)) for r in rows])


MASK = padded([[1.0] * len(r) for r in RESPONSES])


def expected_advantages(p: ExperienceParams, values=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    kl = (padded(OLD_LP) - padded(REF_LP)) * MASK  # k1
    rewards_t = token_rewards(torch.tensor(SCORES), kl if p.kl_in_reward else None, p.kl_coef, MASK)
    adv, ret = estimate_advantages(p.advantage, AdvantageInputs(
        rewards_t, MASK, torch.tensor(GROUPS), None if values is None else padded(values), p.gamma, p.lam))
    if p.whiten_advantages and p.advantage == "gae":
        adv = masked_whiten(adv, MASK)
    return adv, ret


def unpad(t: torch.Tensor) -> list[list[float]]:
    return [row[:len(r)] for row, r in zip(t.tolist(), RESPONSES)]


def assert_rows_close(got: list[list[float]], want: list[list[float]], tol: float = 1e-6) -> None:
    assert [len(r) for r in got] == [len(r) for r in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=tol)


# -- the table -----------------------------------------------------------------------------------------------

def test_experience_table_has_the_schema_and_carries_the_inputs_through():
    table, _ = build(params())
    assert table.schema == EXPERIENCE_SCHEMA
    assert table.num_rows == 4
    cols = table.to_pydict()
    assert cols["prompt_ids"] == PROMPTS and cols["response_ids"] == RESPONSES
    assert cols["group"] == GROUPS and cols["score"] == SCORES
    assert_rows_close(cols["rollout_logprobs"], ROLLOUT_LP)
    assert_rows_close(cols["old_logprobs"], OLD_LP)
    assert_rows_close(cols["ref_logprobs"], REF_LP)
    assert cols["values"] == [[], [], [], []] and cols["returns"] == [[], [], [], []]  # no critic
    assert [len(a) for a in cols["advantages"]] == [3, 0, 4, 1]


def test_grpo_advantages_match_the_estimator_and_hand_values():
    p = params("grpo", kl_in_reward=False)
    table, _ = build(p)
    got = table.column("advantages").to_pylist()
    assert_rows_close(got, unpad(expected_advantages(p)[0]))
    # By hand: group 0 returns (1, 0), group 1 (0.5, -0.5): both ±1/sqrt(2) after the unbiased std.
    a = 1 / math.sqrt(2)
    assert_rows_close(got, [[a] * 3, [], [a] * 4, [-a]], tol=1e-5)


@pytest.mark.parametrize("whiten", [False, True])
def test_gae_advantages_and_returns_match_the_estimator(whiten):
    p = params("gae", whiten_advantages=whiten, gamma=0.9, lam=0.8)
    table, _ = build(p, VALUES)
    adv, ret = expected_advantages(p, VALUES)
    assert_rows_close(table.column("advantages").to_pylist(), unpad(adv), tol=1e-5)
    assert_rows_close(table.column("returns").to_pylist(), unpad(ret), tol=1e-5)
    assert_rows_close(table.column("values").to_pylist(), VALUES)
    real = [x for row in table.column("advantages").to_pylist() for x in row]
    if whiten:
        assert statistics.fmean(real) == pytest.approx(0.0, abs=1e-5)
        assert statistics.stdev(real) == pytest.approx(1.0, abs=1e-4)
    else:
        assert statistics.stdev(real) != pytest.approx(1.0, abs=1e-2)


def test_whitening_is_for_gae_only():
    grpo_plain, _ = build(params("grpo", whiten_advantages=False))
    grpo_whiten, _ = build(params("grpo", whiten_advantages=True))
    assert grpo_plain.column("advantages") == grpo_whiten.column("advantages")


@pytest.mark.parametrize("advantage", ["grpo", "gae", "rloo", "reinforce++"])
def test_kl_in_reward_changes_advantages_and_kl_in_loss_does_not(advantage):
    values = VALUES if advantage == "gae" else None

    def adv(**kw):
        return build(params(advantage, **kw), values)[0].column("advantages").to_pylist()

    in_reward = adv(kl_in_reward=True, kl_coef=0.5)
    in_loss = adv(kl_in_reward=False, kl_coef=0.5)
    no_kl = adv(kl_in_reward=True, kl_coef=0.0)
    assert in_reward != in_loss
    assert_rows_close(in_loss, no_kl)   # with the KL in the loss, the coefficient never reaches the advantages
    assert_rows_close(in_reward, unpad(expected_advantages(params(advantage, kl_coef=0.5), values)[0]), tol=1e-5)


# -- statistics ----------------------------------------------------------------------------------------------

def test_stats_without_critic():
    _, stats = build(params())
    assert stats["reward/mean"] == pytest.approx(statistics.fmean(SCORES))
    assert stats["reward/std"] == pytest.approx(statistics.stdev(SCORES))
    kl_per_seq = [sum(o - r for o, r in zip(old, ref)) for old, ref in zip(OLD_LP, REF_LP)]
    assert stats["kl"] == pytest.approx(statistics.fmean(kl_per_seq))  # the empty response counts with 0
    assert stats["response_length"] == pytest.approx(2.0)
    assert stats["truncated_fraction"] == pytest.approx(0.25)
    gaps = [abs(a - b) for ra, rb in zip(ROLLOUT_LP, OLD_LP) for a, b in zip(ra, rb)]
    assert stats["logprob_gap/mean"] == pytest.approx(statistics.fmean(gaps))
    assert stats["logprob_gap/max"] == pytest.approx(0.375)
    assert stats["reward/task_score"] == pytest.approx(statistics.fmean(TASK_SCORES))
    assert "explained_variance" not in stats and "value/mean" not in stats


def test_finite_steps_count_no_non_finite_values():
    _, stats = build(params())
    assert stats["nonfinite/rewards"] == 0.0 and stats["nonfinite/advantages"] == 0.0


@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo", "reinforce++", "dr_grpo"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_score_is_counted_and_kept_not_hidden(advantage, bad):
    scores = pa.table({"score": pa.array([bad, 0.0, 0.5, -0.5], pa.float32()),
                       "score/task_score": pa.array(TASK_SCORES, pa.float32())})
    table, stats = build_experience(rollouts(), REF_LP, scores, OLD_LP, VALUES if advantage == "gae" else None,
                                    params(advantage, whiten_advantages=True))
    assert stats["nonfinite/rewards"] == 1.0
    advantages = table.column("advantages").to_pylist()
    # Row 0's tokens at least; whitening (gae) and the batch baseline (reinforce++) spread it to every token.
    nonfinite = sum(not math.isfinite(a) for row in advantages for a in row)
    assert nonfinite >= len(RESPONSES[0]) and stats["nonfinite/advantages"] == nonfinite
    if advantage in ("grpo", "rloo", "dr_grpo"):  # the other group is untouched
        assert all(math.isfinite(a) for row in advantages[2:] for a in row)
    assert not math.isfinite(stats["reward/mean"]) and not math.isfinite(stats["advantage/mean"])
    assert not math.isfinite(table.column("score")[0].as_py())  # the table keeps it, no nan_to_num


def test_non_finite_values_reach_the_advantages_not_the_reward_count():
    values = [list(VALUES[0]), [], [math.nan] + VALUES[2][1:], list(VALUES[3])]
    _, stats = build(params("gae"), values)
    assert stats["nonfinite/rewards"] == 0.0
    assert 1.0 <= stats["nonfinite/advantages"] <= len(RESPONSES[2])  # GAE runs backwards: tokens up to the NaN


def test_kl_stat_uses_the_chosen_estimator():
    _, stats = build(params(kl_estimator="k2"))
    kl_per_seq = [sum(0.5 * (o - r) ** 2 for o, r in zip(old, ref)) for old, ref in zip(OLD_LP, REF_LP)]
    assert stats["kl"] == pytest.approx(statistics.fmean(kl_per_seq))


def test_explained_variance_with_values():
    p = params("gae")
    table, stats = build(p, VALUES)
    values = [v for row in VALUES for v in row]
    returns = [x for row in table.column("returns").to_pylist() for x in row]
    residual = [r - v for r, v in zip(returns, values)]
    want = 1 - statistics.pvariance(residual) / statistics.pvariance(returns)
    assert stats["explained_variance"] == pytest.approx(want, abs=1e-5)
    assert stats["value/mean"] == pytest.approx(statistics.fmean(values))


def test_a_single_rollout_has_std_zero():
    one = rollouts().slice(0, 1)
    _, stats = build_experience(one, REF_LP[:1], rewards().slice(0, 1), OLD_LP[:1], None, params())
    assert stats["reward/std"] == 0.0
    assert stats["reward/mean"] == pytest.approx(1.0)


def test_kl_rows_per_token():
    table, _ = build(params())
    got = kl_rows(table, "k1")
    assert_rows_close(got, [[o - r for o, r in zip(old, ref)] for old, ref in zip(OLD_LP, REF_LP)])


# -- joining shards, writing rollouts -------------------------------------------------------------------------

def part(rows: list[int], values: list[list[float]]) -> pa.Table:
    return pa.table({"row": pa.array(rows, pa.int64()), "values": pa.array(values, pa.list_(pa.float32()))})


def test_rows_in_order_joins_shards_back():
    parts = [part([2, 0], [[2.0, 2.5], [0.0]]), part([1, 3], [[], [3.0]])]
    assert rows_in_order(parts, 4) == [[0.0], [], [2.0, 2.5], [3.0]]


def test_rows_in_order_names_the_missing_rows():
    with pytest.raises(ValueError, match=r"rollout rows \[1, 3\]"):
        rows_in_order([part([0, 2], [[0.0], [2.0]])], 4)


def test_write_rollouts_is_readable_parquet(tmp_path):
    table, _ = build(params())
    path = tmp_path / "rollouts" / "step_00000001.parquet"
    write_rollouts(path, rollouts(), table, kl_rows(table, "k1"))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging file left behind
    back = pq.read_table(path).to_pydict()
    assert back["prompt"] == ["p0", "p1", "p2", "p3"] and back["response"] == ["r0", "r1", "r2", "r3"]
    assert back["score"] == SCORES and back["length"] == [3, 0, 4, 1]
    assert back["finish_reason"] == FINISH and json.loads(back["metadata"][2]) == {"i": 2}
    want_kl = [sum(o - r for o, r in zip(old, ref)) for old, ref in zip(OLD_LP, REF_LP)]
    assert back["kl"] == pytest.approx(want_kl)


def test_write_rollouts_replaces_atomically(tmp_path, monkeypatch):
    table, _ = build(params())
    path = tmp_path / "step.parquet"
    write_rollouts(path, rollouts(), table, kl_rows(table, "k1"))
    before = pq.read_table(path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_rollouts(path, rollouts().slice(0, 1), table.slice(0, 1), kl_rows(table.slice(0, 1), "k1"))
    assert pq.read_table(path).equals(before)  # a failed write never leaves a half-written file in place
