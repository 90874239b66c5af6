"""The pure parts of `stages.recovery` (the real kills are in tests/ray/test_faults.py)."""

from __future__ import annotations

from rlhf_ray.distributed.worker_group import shard_rows
from rlhf_ray.stages.recovery import ScorerTimeout, shard_ranks


def test_shard_ranks_are_the_workers_map_shards_calls():
    assert shard_ranks(10, 3) == [0, 1, 2]
    assert shard_ranks(2, 4) == [0, 1]  # workers 2 and 3 get empty shards and no call
    for rows in range(0, 9):
        for actors in range(1, 5):
            expected = [i for i, shard in enumerate(shard_rows(list(range(rows)), actors)) if shard]
            assert shard_ranks(rows, actors) == expected


def test_scorer_timeout_names_the_role_the_ranks_and_the_setting():
    err = ScorerTimeout("reward", [1, 3], 8.0)
    assert (err.role, err.ranks, err.seconds) == ("reward", [1, 3], 8.0)
    assert str(err) == "reward actor(s) [1, 3]: no answer within reward.timeout_s=8 s"
