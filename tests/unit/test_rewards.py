"""Rule-based reward functions: loading by import path, checking their answers, and the built-in ones."""

from __future__ import annotations

import math

import pytest

from rlhf_ray.rewards import (
    RewardFunctionError,
    call_reward_function,
    load_reward_function,
)
from rlhf_ray.rewards.tasks import exact_match, task_score

PATH = "my.rewards:fn"


# -- loading -----------------------------------------------------------------------------------------------

def test_load_finds_the_function():
    assert load_reward_function("rlhf_ray.rewards.tasks:task_score") is task_score
    assert load_reward_function("rlhf_ray.rewards.tasks:exact_match") is exact_match


@pytest.mark.parametrize("path", ["rlhf_ray.rewards.tasks.task_score", "rlhf_ray.rewards.tasks:", ":task_score", ""])
def test_load_needs_module_colon_function(path):
    with pytest.raises(RewardFunctionError, match="expected 'package.module:function'") as err:
        load_reward_function(path)
    assert repr(path) in str(err.value)


def test_load_names_a_module_that_does_not_import():
    with pytest.raises(RewardFunctionError, match="cannot import 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")


def test_load_names_a_missing_attribute():
    with pytest.raises(RewardFunctionError, match="rlhf_ray.rewards.tasks has no callable 'nope'"):
        load_reward_function("rlhf_ray.rewards.tasks:nope")


def test_load_rejects_something_not_callable():
    with pytest.raises(RewardFunctionError, match="no callable 'TASKS'"):  # a dict in that module
        load_reward_function("rlhf_ray.rewards.tasks:TASKS")


# -- calling -----------------------------------------------------------------------------------------------

def call(fn, responses=("a", "b")):
    responses = list(responses)
    return call_reward_function(PATH, fn, ["p"] * len(responses), responses, [{}] * len(responses))


def test_call_returns_floats():
    assert call(lambda p, r, m: [1, True]) == [1.0, 1.0]
    assert all(type(v) is float for v in call(lambda p, r, m: (0, 2)))


def test_call_reports_the_function_and_its_error():
    def boom(p, r, m):
        raise KeyError("task")

    with pytest.raises(RewardFunctionError, match=r"my\.rewards:fn raised KeyError: 'task'") as err:
        call(boom)
    assert isinstance(err.value.__cause__, KeyError)


def test_call_checks_the_count():
    with pytest.raises(RewardFunctionError, match="my.rewards:fn returned 1 values for 2 responses"):
        call(lambda p, r, m: [1.0])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_call_passes_non_finite_values_on(bad):
    # The bad-step guard of the RLHF loop skips such a step; the reward actor warns and names the function.
    values = call(lambda p, r, m: [0.0, bad])
    assert values[0] == 0.0 and (math.isnan(values[1]) if math.isnan(bad) else values[1] == bad)


@pytest.mark.parametrize("result", [["x", 1.0], [None, 1.0], None, 3.0, [[1.0], [2.0]], "10", b"10"])
def test_call_rejects_non_numbers(result):
    with pytest.raises(RewardFunctionError, match="my.rewards:fn must return numbers"):
        call(lambda p, r, m: result)


# -- built-in functions ------------------------------------------------------------------------------------

def test_task_score_grades_by_position():
    metadata = [{"task": "reverse", "input": "abc"}] * 3 + [{"task": "add", "input": "2+3"}]
    got = task_score(["p"] * 4, ["cba", " cbx\n", "", "5"], metadata)
    assert got == pytest.approx([1.0, 2 / 3, 0.0, 1.0])


@pytest.mark.parametrize("meta", [{}, {"task": "translate", "input": "x"}, {"task": "reverse"},
                                  {"task": "reverse", "input": 3}])
def test_task_score_needs_a_synthetic_task_and_input(meta):
    with pytest.raises(ValueError, match="task_score needs metadata"):
        task_score(["p"], ["x"], [meta])


def test_task_score_error_is_reported_through_call():
    with pytest.raises(RewardFunctionError, match="raised ValueError: task_score needs metadata"):
        call_reward_function("rlhf_ray.rewards.tasks:task_score", task_score, ["p"], ["x"], [{}])


def test_exact_match_trims_whitespace():
    metadata = [{"reference": "olleh"}, {"reference": " 42 "}, {"reference": "abc"}]
    assert exact_match(["p"] * 3, ["olleh\n", "42", "ab"], metadata) == [1.0, 1.0, 0.0]


def test_exact_match_needs_a_reference():
    with pytest.raises(ValueError, match="exact_match needs a 'reference'"):
        exact_match(["p"], ["x"], [{"output": "x"}])
