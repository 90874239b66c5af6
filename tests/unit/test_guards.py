"""The bad-step guard: which statistic makes a step bad, counting in a row and in total, and the error."""

from __future__ import annotations

import math

import pytest

from rlhf_ray.stages.guards import BadStepGuard, BadStepsError, bad_statistic, phase_of


def test_finite_statistics_are_not_bad():
    assert bad_statistic({"reward/mean": 0.5, "nonfinite/rewards": 0.0, "loss": -1.0, "grad_norm": 3.0}) is None
    assert bad_statistic({}) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_statistic_is_named(bad):
    assert bad_statistic({"reward/mean": 0.5, "policy/loss": bad, "grad_norm": 1.0}) == "policy/loss"
    assert bad_statistic({"grad_norm": bad}) == "grad_norm"


def test_a_non_zero_count_is_bad_and_named_before_the_means_it_reached():
    stats = {"reward/mean": math.nan, "advantage/mean": math.nan, "nonfinite/rewards": 2.0,
             "nonfinite/advantages": 7.0}
    assert bad_statistic(stats) == "nonfinite/rewards"
    assert bad_statistic({"nonfinite/loss": 1.0, "loss": 0.5}) == "nonfinite/loss"


def test_what_may_be_nan_and_what_is_not_a_number_are_ignored():
    assert bad_statistic({"explained_variance": math.nan, "note": "x", "skipped": False}) is None


@pytest.mark.parametrize("name, phase", [("reward/mean", "score"), ("nonfinite/rewards", "score"),
                                         ("reward/task_score", "score"), ("advantage/mean", "advantages"),
                                         ("nonfinite/advantages", "advantages"), ("loss", "train"),
                                         ("policy/loss", "train"), ("grad_norm", "train"),
                                         ("nonfinite/loss", "train")])
def test_phase_by_name(name, phase):
    assert phase_of(name) == phase


def test_counts_in_a_row_and_in_total():
    guard = BadStepGuard(3)
    assert guard.metrics() == {"bad_steps/skipped": 0.0, "bad_steps/total": 0.0, "bad_steps/in_a_row": 0.0}
    for step, bad in enumerate([True, True, False, True], start=1):
        found = guard.check(step, None, {"loss": math.nan if bad else 1.0})
        assert found == ("loss" if bad else None)
        guard.record(bad)
    assert guard.metrics() == {"bad_steps/skipped": 1.0, "bad_steps/total": 3.0, "bad_steps/in_a_row": 1.0}
    guard.record(False)
    assert guard.metrics() == {"bad_steps/skipped": 0.0, "bad_steps/total": 3.0, "bad_steps/in_a_row": 0.0}


def test_max_bad_steps_in_a_row_stops_with_step_phase_and_statistic():
    guard = BadStepGuard(2)
    guard.check(6, "score", {"reward/mean": math.nan, "nonfinite/rewards": 3.0})
    guard.record(True)
    guard.check(7, None, {"reward/mean": 1.0})
    guard.check(7, "train", {"loss": math.inf, "grad_norm": math.nan})
    guard.check(7, "train", {"grad_norm": math.nan})  # a later bad statistic of the same step is not the one named
    with pytest.raises(BadStepsError, match=r"2 steps in a row .*run\.max_bad_steps=2.*step 7, phase train, "
                                            r"statistic 'loss'.*resume=auto") as err:
        guard.record(True)
    assert isinstance(err.value, RuntimeError)


def test_the_phase_is_told_by_the_statistic_when_not_given():
    guard = BadStepGuard(1)
    guard.check(3, None, {"nonfinite/advantages": 4.0})
    with pytest.raises(BadStepsError, match="step 3, phase advantages, statistic 'nonfinite/advantages'"):
        guard.record(True)


def test_one_bad_step_stops_at_one_and_a_limit_under_one_is_an_error():
    guard = BadStepGuard(1)
    guard.record(False)
    with pytest.raises(BadStepsError, match="1 steps in a row .*run.max_bad_steps=1.*step 0, phase unknown"):
        guard.record(True)  # a step the driver skipped without a statistic checked
    for bad in (0, -1):
        with pytest.raises(ValueError, match="run.max_bad_steps must be >= 1"):
            BadStepGuard(bad)


def test_counts_under_the_drivers_prefix_are_counts():
    assert bad_statistic({"policy/loss": 0.5, "policy/nonfinite/loss": 0.25}) == "policy/nonfinite/loss"
    assert phase_of("policy/nonfinite/grad_norm") == "train"


def test_state_survives_a_resume():
    guard = BadStepGuard(5)
    for bad in (True, False, True, True):
        guard.record(bad)
    resumed = BadStepGuard(5)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.metrics()["bad_steps/total"] == 3.0 and resumed.metrics()["bad_steps/in_a_row"] == 2.0
