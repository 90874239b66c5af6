"""Fault drills: reward functions that misbehave on request, to check a cluster's recovery end to end.

`hang_then_task_score` scores like `rlhf_ray.rewards.tasks:task_score`, except that while the drill file
`<RLHF_RAY_CACHE>/drills/reward_hangs` holds a number N > 0 a call decrements it and then hangs (as a reward
function stuck on a remote service would). With `reward.timeout_s` the run replaces the hung reward actor
and retries the step:

    echo 1 > ~/.cache/rlhf_ray/drills/reward_hangs
    rlhf-ray rlhf my.yaml reward.functions="[{path: 'rlhf_ray.rewards.drills:hang_then_task_score'}]" \\
        reward.timeout_s=30

`nan_then_task_score` returns NaN for every row of the next N calls (file `reward_nans`), as a broken
reward model would: the step's update is skipped and counted, and `run.max_bad_steps` in a row stop the run.

The files live in the project cache (`rlhf_ray.models.tiny.cache_dir`), which every actor of a run shares.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from rlhf_ray.models.tiny import cache_dir
from rlhf_ray.rewards.tasks import task_score

HANG_SECONDS = 3600.0


def drill_file(name: str = "reward_hangs") -> Path:
    """The file whose number says how many more reward calls misbehave (`reward_hangs`, `reward_nans`)."""
    return cache_dir() / "drills" / name


def take_hang(name: str = "reward_hangs") -> bool:
    """Whether this call misbehaves: consumes one of the file's count (under a lock: actors share it)."""
    path = drill_file(name)
    if not path.is_file():
        return False
    with open(path, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        left = int(f.read().strip() or 0)
        if left <= 0:
            return False
        f.seek(0)
        f.truncate()
        f.write(str(left - 1))
    return True


def hang_then_task_score(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    if take_hang():
        time.sleep(HANG_SECONDS)
    return task_score(prompts, responses, metadata)


def nan_then_task_score(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """`task_score`, except that while `<RLHF_RAY_CACHE>/drills/reward_nans` holds N > 0 a call returns NaN for
    every row (and decrements N): the step's update is skipped and counted (`run.max_bad_steps`)."""
    if take_hang("reward_nans"):
        return [float("nan")] * len(responses)
    return task_score(prompts, responses, metadata)
