"""Answer checkers: grade one held-out answer for the evaluation's accuracy metrics (`eval.checker`).

A checker is any callable

    def check(metadata: dict, response: str) -> Optional[float]

named in the config as `package.module:function`, like a reward function. It gets the held-out row's metadata
(the dataset's extra fields, plus `reference` when the row has an answer) and the greedy response, and returns
None when it cannot grade that row, else a finite score where 1.0 means correct. Evaluation reports `accuracy`
(the share of graded rows scoring 1.0) and the mean score over the graded rows. A checker that raises or
returns anything else stops the run with an error naming `eval.checker`.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

from rlhf_ray.rewards import RewardFunctionError, load_function

CHECKER_KEY = "eval.checker"

AnswerChecker = Callable[[dict, str], Optional[float]]


def load_checker(path: Optional[str]) -> Optional[AnswerChecker]:
    """The checker `eval.checker` names (None when it is null); a bad path is an error naming the key."""
    return None if path is None else load_function(path, CHECKER_KEY)


def grade_answers(path: Optional[str], metadata: Sequence[dict], responses: Sequence[str]) -> list[Optional[float]]:
    """Each response's grade by the checker at `path` (None: that row cannot be graded; every row when `path` is
    null). The path, not the function, travels: a Ray task resolves it where it runs."""
    checker = load_checker(path)
    if checker is None:
        return [None] * len(responses)
    return [_grade(path, checker, meta, response) for meta, response in zip(metadata, responses)]


def _grade(path: str, checker: AnswerChecker, metadata: dict, response: str) -> Optional[float]:
    try:
        grade = checker(metadata, response)
    except Exception as err:  # the user's code: report which checker failed, with its error
        raise RewardFunctionError(f"{CHECKER_KEY} {path} raised {type(err).__name__}: {err}") from err
    if grade is None:
        return None
    if not isinstance(grade, numbers.Real) or not math.isfinite(grade):
        raise RewardFunctionError(f"{CHECKER_KEY} {path} must return a finite number or None, got {grade!r:.60} "
                                  f"for response {response!r:.60}")
    return float(grade)


def grade_summary(grades: Sequence[Optional[float]]) -> Optional[tuple[float, float]]:
    """(accuracy, mean score) over the graded entries, accuracy being the share exactly 1.0; None when no entry
    is graded."""
    graded = [g for g in grades if g is not None]
    if not graded:
        return None
    return sum(g == 1.0 for g in graded) / len(graded), sum(graded) / len(graded)
