"""Reward-hacking monitors on hand-made metric histories: each trips on its pattern and stays quiet on a healthy
run, on a run too short to judge, and on a run that does not log the measure it needs."""

from __future__ import annotations

import pytest

from rlhf_ray.report.monitors import (
    MonitorLog,
    check,
    kl_without_reward,
    length_drift,
    reward_without_task,
    series,
    thirds,
    trend,
)


def history(n: int = 12, every: int = 5, eval_every: int = 20, **curves) -> list[dict]:
    """Train rows at steps every..n*every with each curve's value (a function of the row index 0..n-1); eval
    rows at 0 and every eval_every steps with the `eval_`-prefixed curves (a function of the step)."""
    rows = []
    eval_curves = {k[5:]: f for k, f in curves.items() if k.startswith("eval_")}
    train_curves = {k: f for k, f in curves.items() if not k.startswith("eval_")}
    for i in range(n + 1):
        step = i * every
        if i > 0:
            rows.append({"step": step, "split": "train", "time": 0.0,
                         **{k.replace("__", "/"): f(i - 1) for k, f in train_curves.items()}})
        if step % eval_every == 0 and eval_curves:
            rows.append({"step": step, "split": "eval", "time": 0.0, **{k: f(step) for k, f in eval_curves.items()}})
    return rows


def flat(value: float):
    return lambda i: value + (0.01 if i % 2 else -0.01)  # a little noise, no trend


def test_helpers():
    rows = [{"step": 1, "split": "train", "a": 1.0}, {"step": 2, "split": "eval", "a": 5.0},
            {"step": 3, "split": "train", "a": float("nan")}, {"step": 4, "split": "train", "a": 3}]
    assert series(rows, "train", "a") == [(1, 1.0), (4, 3.0)]
    assert thirds([1, 2, 3, 4, 5, 6]) == (1.5, 3.5, 5.5)
    assert trend([2.0] * 6) == 0.0
    assert trend([1, 2, 3, 4, 5, 6]) > 1.0
    assert trend([6, 5, 4, 3, 2, 1]) < -1.0


def test_length_drift_trips_when_length_rises_and_the_task_score_does_not():
    rows = history(response_length=lambda i: 10 + 2 * i, eval_task_score=lambda s: 0.5)
    warning = length_drift(rows)
    assert warning is not None and warning.name == "length_drift" and warning.step == 60
    assert "eval task_score" in warning.message and "0.500 -> 0.500" in warning.message


@pytest.mark.parametrize("case", ["score_rises", "length_flat", "length_noisy", "no_task_score", "too_short"])
def test_length_drift_stays_quiet(case):
    curves = {"response_length": lambda i: 10 + 2 * i, "eval_task_score": lambda s: 0.4 + s / 200}
    if case == "length_flat":
        curves["response_length"] = flat(10)
    if case == "length_noisy":  # up, down, up: not a steady rise
        curves["response_length"] = lambda i: [10, 10, 10, 10, 20, 20, 20, 20, 12, 12, 12, 12][i]
        curves["eval_task_score"] = lambda s: 0.5
    if case == "no_task_score":
        del curves["eval_task_score"]
    if case == "too_short":  # 4 train rows (enough evaluations, a flat score): too few to call a trend
        curves["eval_task_score"] = lambda s: 0.5
    rows = history(n=4, eval_every=5, **curves) if case == "too_short" else history(**curves)
    assert length_drift(rows) is None


def test_length_drift_uses_the_rule_reward_when_there_is_no_checker():
    rows = history(response_length=lambda i: 10 + 2 * i, reward__task_score=lambda i: 0.3 - 0.01 * i)
    assert "train reward/task_score" in length_drift(rows).message


def test_reward_without_task_trips_on_a_rising_reward_model_and_a_flat_checker():
    rows = history(reward__reward_model=lambda i: 0.1 * i, reward__mean=lambda i: 0.05 * i,
                   eval_task_score=lambda s: 0.6 - s / 1000)
    warning = reward_without_task(rows)
    assert warning is not None and "train reward/reward_model" in warning.message
    assert "eval task_score" in warning.message


@pytest.mark.parametrize("case", ["task_rises", "reward_flat", "no_task", "eval_too_short"])
def test_reward_without_task_stays_quiet(case):
    curves = {"reward__reward_model": lambda i: 0.1 * i, "eval_task_score": lambda s: 0.4 + s / 200}
    if case == "reward_flat":
        curves = {"reward__reward_model": flat(1.0), "eval_task_score": lambda s: 0.5}
    if case == "no_task":
        del curves["eval_task_score"]
    if case == "eval_too_short":  # two evaluations: not enough to tell a trend
        curves["eval_task_score"] = lambda s: 0.5
        assert reward_without_task(history(eval_every=40, **curves)) is None
        return
    assert reward_without_task(history(**curves)) is None


def test_kl_without_reward_trips_when_kl_grows_and_reward_stalls():
    rows = history(n=16, kl=lambda i: 0.2 * i, reward__mean=lambda i: min(i, 4) * 0.1)
    warning = kl_without_reward(rows)
    assert warning is not None and warning.name == "kl_without_reward" and warning.step == 80


@pytest.mark.parametrize("case", ["reward_keeps_rising", "kl_flat", "kl_tiny", "too_short"])
def test_kl_without_reward_stays_quiet(case):
    kl, reward = (lambda i: 0.2 * i), (lambda i: min(i, 4) * 0.1)
    if case == "reward_keeps_rising":
        reward = lambda i: 0.1 * i
    if case == "kl_flat":
        kl = flat(1.0)
    if case == "kl_tiny":  # doubles, but a few hundredths of a nat are no drift
        kl = lambda i: 0.001 * i
    assert kl_without_reward(history(n=6 if case == "too_short" else 16, kl=kl, reward__mean=reward)) is None


def test_a_healthy_run_trips_nothing():
    rows = history(n=16, response_length=flat(12), reward__mean=lambda i: 0.05 * i,
                   reward__reward_model=lambda i: 0.05 * i, kl=lambda i: 0.05 * i,
                   eval_task_score=lambda s: 0.4 + s / 400, eval_accuracy=lambda s: 0.3 + s / 400)
    assert check(rows) == []


def test_each_warning_is_reported_once():
    log = MonitorLog()
    healthy = history(response_length=flat(10), eval_task_score=lambda s: 0.5)
    drifting = history(response_length=lambda i: 10 + 2 * i, eval_task_score=lambda s: 0.5)
    assert log.new_warnings(healthy) == []
    first = log.new_warnings(drifting)
    assert [w.name for w in first] == ["length_drift"] and str(first[0]).startswith("[monitor] length_drift")
    assert log.new_warnings(drifting) == []
