"""Rule-based reward functions: the interface for user ones, and loading them by import path.

A reward function is any callable

    def my_reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]

named in the config as `package.module:function`. It gets the rendered prompts, the decoded responses and
each prompt row's metadata (the dataset's extra fields: `task`, `input`, `reference`, ...), and returns one
float per response. A function that raises, or returns the wrong count or something that is not a number,
stops the run with an error naming the function. A NaN or infinite value is passed on as it is: the reward
actor warns about it and the RLHF loop's bad-step guard skips the step (`run.max_bad_steps`).
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

RewardFunction = Callable[[list[str], list[str], list[dict]], Sequence[float]]


class RewardFunctionError(RuntimeError):
    """A user function named in the config (a reward function, the eval answer checker) could not be loaded,
    raised, or returned something other than what its interface promises."""


def load_function(path: str, what: str) -> Callable:
    """`package.module:function` -> the callable, with errors that say what is wrong with the path; `what`
    names the function in them (e.g. "reward function", or the config key "eval.checker")."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(f"{what} {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardFunctionError(f"{what} {path!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardFunctionError(f"{what} {path!r}: {module_name} has no callable {attr!r}")
    return fn


def load_reward_function(path: str) -> RewardFunction:
    """`package.module:function` -> the reward function, with errors that say what is wrong with the path."""
    return load_function(path, "reward function")


def call_reward_function(path: str, fn: RewardFunction, prompts: list[str], responses: list[str],
                         metadata: list[dict]) -> list[float]:
    """Call `fn` and check its answer: one float per response (NaN and infinities are passed on)."""
    try:
        values = fn(prompts, responses, metadata)
    except Exception as err:  # the user's code: report which function failed, with its error
        raise RewardFunctionError(f"reward function {path} raised {type(err).__name__}: {err}") from err
    try:
        if isinstance(values, (str, bytes)):  # iterable, so "10" would pass as [1.0, 0.0]
            raise TypeError(f"got a {type(values).__name__}")
        values = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise RewardFunctionError(f"reward function {path} must return numbers, got {values!r:.80}") from err
    if len(values) != len(responses):
        raise RewardFunctionError(f"reward function {path} returned {len(values)} values for "
                                  f"{len(responses)} responses")
    return values


