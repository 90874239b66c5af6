"""The bad-step guard of the RLHF loop: a step whose rewards, advantages, loss or gradients are NaN or infinite
is skipped (the learners leave the weights, the optimizer moments and the LR schedule as they were) and
counted; `run.max_bad_steps` bad steps in a row stop the run with an error naming the step, the phase and the
statistic, so a run never goes on training on, or checkpointing, a model that NaN has reached.

Pure Python: the driver calls `check` on each phase's statistics and `record` once per step.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

# Which phase of a step each statistic belongs to, by key prefix (the first match wins; the rest is "train").
_PHASES = (("reward/", "score"), ("nonfinite/rewards", "score"), ("advantage", "advantages"),
           ("nonfinite/advantages", "advantages"), ("explained_variance", "advantages"), ("value/", "advantages"))


def _is_count(name: str) -> bool:
    """A count of non-finite values (`nonfinite/...`, also under a prefix such as the driver's `policy/`): any
    count above 0 makes the step bad, although the count itself is finite."""
    return name.startswith("nonfinite/") or "/nonfinite/" in name


# Statistics that are legitimately NaN (e.g. explained variance of constant returns): never a reason to skip.
_MAY_BE_NAN = ("explained_variance",)


class BadStepsError(RuntimeError):
    """`run.max_bad_steps` steps in a row had a non-finite reward, advantage, loss or gradient."""


def phase_of(statistic: str) -> str:
    """The phase of a step (score / advantages / train) that produced `statistic`."""
    return next((phase for prefix, phase in _PHASES if statistic.startswith(prefix)), "train")


def bad_statistic(stats: Mapping[str, float]) -> Optional[str]:
    """The first `nonfinite/...` count of `stats` that is not 0, else the first statistic that is NaN or
    infinite; None when every one is finite. Non-numeric values are ignored."""
    numbers = [(name, float(value)) for name, value in stats.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.startswith(_MAY_BE_NAN)]
    # The counts first: they say where the NaN came from, the means it reached only follow.
    for name, value in numbers:
        if _is_count(name) and value != 0.0:
            return name
    return next((name for name, value in numbers if not math.isfinite(value)), None)


class BadStepGuard:
    """Counts bad steps; raises `BadStepsError` after `max_bad_steps` (`run.max_bad_steps`, >= 1) in a row.

    Per step: `check(step, phase, stats)` on each phase's statistics as they arrive (it returns the offending
    statistic, and remembers the first one of the step), then `record(bad)` once, then `metrics()` to log."""

    def __init__(self, max_bad_steps: int):
        if max_bad_steps < 1:
            raise ValueError(f"run.max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.total = 0
        self.in_a_row = 0
        self.skipped = False
        self._first: Optional[tuple[int, str, str]] = None  # (step, phase, statistic) of this step

    def check(self, step: int, phase: Optional[str], stats: Mapping[str, float]) -> Optional[str]:
        """The statistic of `stats` that is non-finite (or a non-zero `nonfinite/` count), or None. `step` is
        the 1-based step as logged; `phase` (score / advantages / train) None: told by the statistic's name."""
        name = bad_statistic(stats)
        if name is not None and self._first is None:
            self._first = (step, phase or phase_of(name), name)
        return name

    def record(self, bad: bool) -> None:
        """End of a step: `bad` True when it was skipped. Raises `BadStepsError` on the `max_bad_steps`-th bad
        step in a row."""
        self.skipped = bad
        first, self._first = self._first, None
        if not bad:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad_steps:
            step, phase, name = first or (0, "unknown", "unknown")
            raise BadStepsError(
                f"{self.in_a_row} steps in a row had non-finite values (run.max_bad_steps={self.max_bad_steps}); "
                f"the last: step {step}, phase {phase}, statistic {name!r}. Every one was skipped, so the last "
                "checkpoint and the model are finite. Look at that phase's inputs (reward model / reward "
                "functions for 'score', values and rewards for 'advantages', learning rate, gradient clipping "
                "and dtype for 'train'), then resume from the last checkpoint (resume=auto), or raise "
                "run.max_bad_steps to tolerate more in a row.")

    def metrics(self) -> dict[str, float]:
        """bad_steps/skipped (1 when this step was skipped), bad_steps/total, bad_steps/in_a_row."""
        return {"bad_steps/skipped": float(self.skipped), "bad_steps/total": float(self.total),
                "bad_steps/in_a_row": float(self.in_a_row)}

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint keeps, so a resumed run counts on."""
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.total, self.in_a_row = int(state.get("total", 0)), int(state.get("in_a_row", 0))
