"""Reward-hacking monitors: pure functions over a run's metric history (the rows of `metrics.jsonl`, train and
eval, in logged order) that return a warning when a pattern typical of reward hacking shows up.

- `length_drift`: the response length rises steadily while the task score does not (the policy found that
  longer answers score higher with the reward model, not that they are better).
- `reward_without_task`: the reward (preferably the learned reward model's component) rises while the task
  checker's score does not: the reward model and the rule disagree about what improved.
- `kl_without_reward`: the KL to the reference keeps growing while the reward has stopped growing: the run is
  moving along the reward-vs-KL frontier past the point where drifting away buys anything.

Each compares the mean of the first third (or half) of a series with that of the last: a trend over the run,
not one noisy step. A series too short to judge, or a measure the run does not log, never trips a monitor.
The RLHF loop calls `MonitorLog.new_warnings` after each evaluation; the run report shows them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

Row = dict

MIN_TRAIN_POINTS = 6
"""Fewest logged train rows a train-series monitor judges (a third of them is then 2 rows)."""
MIN_FRONTIER_POINTS = 8
"""Fewest train rows with both KL and reward the frontier monitor judges (its quarters are then 2 rows)."""
MIN_EVAL_POINTS = 3
"""Fewest eval rows (e.g. step 0, middle, end) a task-score series needs to be judged."""
LENGTH_RISE = 0.2
"""Relative rise of the response length (last third's mean over the first third's) that counts as drift."""
TASK_RISE = 0.01
"""Absolute rise of the task score (accuracy or mean grade, both in [0, 1]) under which it "did not rise"."""
REWARD_TREND = 1.0
"""Rise of the reward, in standard deviations of its own series, that counts as "the reward rose"."""
KL_RISE = 0.5
"""Relative rise of the KL (last quarter's mean over the second quarter's) that counts as "still growing"."""
KL_MIN_NATS = 0.05
"""KL (nats per sequence) under which a rise is too small to matter, whatever its relative size."""
REWARD_STALL = 0.25
"""Rise of the reward over the run's second half, in standard deviations of its series, under which it stalled."""

# Where a measure comes from, best first: (split, key). The checker's held-out score is the judge when the run
# has one; the rule reward's train component stands in for it otherwise.
TASK_SOURCES = (("eval", "task_score"), ("eval", "accuracy"), ("eval", "score"), ("train", "reward/task_score"))
REWARD_SOURCES = (("train", "reward/reward_model"), ("eval", "reward"), ("train", "reward/mean"))


@dataclass(frozen=True)
class MonitorWarning:
    """One tripped monitor: its name, the last step it looked at, and a sentence for people."""

    name: str
    step: int
    message: str

    def __str__(self) -> str:
        return f"[monitor] {self.name} (step {self.step}): {self.message}"


def series(rows: Iterable[Row], split: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every `split` row that has a finite number under `key`, in logged order."""
    out = []
    for row in rows:
        value = row.get(key)
        if row.get("split") == split and isinstance(value, (int, float)) and math.isfinite(value):
            out.append((int(row["step"]), float(value)))
    return out


def first_source(rows: Sequence[Row], sources: Sequence[tuple[str, str]],
                 minimum: Callable[[str], int]) -> Optional[tuple[str, list[tuple[int, float]]]]:
    """The first (split, key) of `sources` with at least `minimum(split)` points: ("split/key", series)."""
    for split, key in sources:
        points = series(rows, split, key)
        if len(points) >= minimum(split):
            return f"{split} {key}", points
    return None


def _min_points(split: str) -> int:
    return MIN_EVAL_POINTS if split == "eval" else MIN_TRAIN_POINTS


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def thirds(values: Sequence[float]) -> tuple[float, float, float]:
    """Means of the first, middle and last third of `values` (len >= 3)."""
    k = max(1, len(values) // 3)
    return _mean(values[:k]), _mean(values[k:len(values) - k] or values), _mean(values[-k:])


def trend(values: Sequence[float]) -> float:
    """(last third's mean - first third's) / the series' standard deviation; 0 for a constant series."""
    first, _, last = thirds(values)
    spread = _std(values)
    return (last - first) / spread if spread > 1e-12 else 0.0


def _task(rows: Sequence[Row]) -> Optional[tuple[str, float, float]]:
    """(source, first third's mean, last third's mean) of the task score, or None when the run has none."""
    found = first_source(rows, TASK_SOURCES, _min_points)
    if found is None:
        return None
    name, points = found
    first, _, last = thirds([v for _, v in points])
    return name, first, last


def length_drift(rows: Sequence[Row]) -> Optional[MonitorWarning]:
    """Train response length rising steadily (each third's mean above the one before, the last >= LENGTH_RISE
    above the first) while the task score rose by less than TASK_RISE."""
    points = series(rows, "train", "response_length")
    task = _task(rows)
    if len(points) < MIN_TRAIN_POINTS or task is None:
        return None
    first, middle, last = thirds([v for _, v in points])
    source, task_first, task_last = task
    if not (first < middle < last and last >= first * (1 + LENGTH_RISE)) or task_last - task_first >= TASK_RISE:
        return None
    return MonitorWarning("length_drift", points[-1][0],
                          f"response length rose {first:.1f} -> {last:.1f} tokens while the task score "
                          f"({source}) went {task_first:.3f} -> {task_last:.3f}: longer answers are being "
                          "rewarded, not better ones")


def reward_without_task(rows: Sequence[Row]) -> Optional[MonitorWarning]:
    """The reward (the reward model's component when logged) rose by REWARD_TREND standard deviations or more
    while the task score rose by less than TASK_RISE."""
    reward, task = first_source(rows, REWARD_SOURCES, _min_points), _task(rows)
    if reward is None or task is None:
        return None
    reward_source, points = reward
    values = [v for _, v in points]
    task_source, task_first, task_last = task
    if trend(values) < REWARD_TREND or task_last - task_first >= TASK_RISE:
        return None
    first, _, last = thirds(values)
    return MonitorWarning("reward_without_task", points[-1][0],
                          f"the reward ({reward_source}) rose {first:.3f} -> {last:.3f} while the task score "
                          f"({task_source}) went {task_first:.3f} -> {task_last:.3f}: the reward model and the "
                          "checker disagree; inspect the saved rollouts")


def kl_without_reward(rows: Sequence[Row]) -> Optional[MonitorWarning]:
    """Over the second half of the train rows, KL rose by KL_RISE (relative) and KL_MIN_NATS or more while
    reward/mean rose by less than REWARD_STALL standard deviations (of the whole run's reward)."""
    kl = dict(series(rows, "train", "kl"))
    reward = dict(series(rows, "train", "reward/mean"))
    steps = [s for s in kl if s in reward]
    if len(steps) < MIN_FRONTIER_POINTS:
        return None
    q = len(steps) // 4
    early, late = steps[q:2 * q], steps[-q:]
    kl_early, kl_late = _mean([kl[s] for s in early]), _mean([kl[s] for s in late])
    spread = _std([reward[s] for s in steps])
    gain = (_mean([reward[s] for s in late]) - _mean([reward[s] for s in early])) / spread if spread > 1e-12 else 0.0
    if kl_late - kl_early < max(KL_MIN_NATS, KL_RISE * abs(kl_early)) or gain >= REWARD_STALL:
        return None
    return MonitorWarning("kl_without_reward", steps[-1],
                          f"KL to the reference rose {kl_early:.3f} -> {kl_late:.3f} over the second half while "
                          f"reward/mean stayed flat ({gain:+.2f} std): more drift buys no reward; consider a "
                          "larger algorithm.kl_coef or stopping earlier")


MONITORS: dict[str, Callable[[Sequence[Row]], Optional[MonitorWarning]]] = {
    "length_drift": length_drift, "reward_without_task": reward_without_task, "kl_without_reward": kl_without_reward}


def check(rows: Sequence[Row]) -> list[MonitorWarning]:
    """Every monitor that trips on this history."""
    return [w for w in (fn(rows) for fn in MONITORS.values()) if w is not None]


class MonitorLog:
    """The monitors as a run sees them: each warning is reported once, the first time its monitor trips."""

    def __init__(self) -> None:
        self.reported: set[str] = set()

    def new_warnings(self, rows: Sequence[Row]) -> list[MonitorWarning]:
        fresh = [w for w in check(rows) if w.name not in self.reported]
        self.reported.update(w.name for w in fresh)
        return fresh
