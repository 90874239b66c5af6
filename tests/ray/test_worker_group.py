"""`WorkerGroup` on its own, on the session's local Ray instance: the one helper that places every role.

Checked directly (the roles use it through GeneratorGroup, LearnerGroup and the scorer groups): one bundle per
worker with the spec's resources, ranks in bundle order, per-rank constructor arguments, the torch.distributed
rendezvous only for a distributed role (and its environment on every rank), `map_shards` with the one sharding
rule, a clear error when the cluster cannot hold the group, and shutdown releasing the reservation.
"""

from __future__ import annotations

import os

import pytest
import ray
from ray.util.placement_group import placement_group_table

from rlhf_ray.config import PlacementConfig
from rlhf_ray.distributed.worker_group import (
    DistributedWorker,
    PlacementError,
    WorkerGroup,
    group_spec,
    shard_rows,
)


class Member(DistributedWorker):
    """A stand-in role: remembers its constructor arguments and reports its environment."""

    def __init__(self, shared: str, seed: int = -1):
        self.shared, self.seed = shared, seed

    def describe(self) -> dict:
        env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        return {"shared": self.shared, "seed": self.seed, "rank": self.rank, "world": self.world_size, **env,
                "pid": os.getpid()}

    def echo(self, rows: list[int]) -> list[int]:
        return [r * 10 for r in rows]


def _bundles(group: WorkerGroup) -> list[dict]:
    return placement_group_table(group.placement_group)["bundles"].values()


def test_distributed_group_places_ranks_and_sets_up_the_rendezvous(ray_cluster):
    spec = group_spec("wg-dist", 3, PlacementConfig(cpus=0.25, resources={"train_node": 1}), gpus=1.0, device="cpu")
    assert spec.gpus_per_worker == 0.0  # GPUs only on CUDA
    group = WorkerGroup(Member, spec, "hello", distributed=True, rank_kwargs=lambda rank: {"seed": 100 + rank})
    try:
        described = group.get(lambda actor, _: actor.describe.remote())
        assert [d["rank"] for d in described] == [0, 1, 2] and {d["world"] for d in described} == {3}
        assert [d["seed"] for d in described] == [100, 101, 102] and {d["shared"] for d in described} == {"hello"}
        assert [d["RANK"] for d in described] == ["0", "1", "2"] and {d["WORLD_SIZE"] for d in described} == {"3"}
        assert sorted(d["LOCAL_RANK"] for d in described) == ["0", "1", "2"]  # one node: ranks 0..2 on it
        assert len({(d["MASTER_ADDR"], d["MASTER_PORT"]) for d in described}) == 1  # one rendezvous point
        assert len({d["pid"] for d in described}) == 3 and len(group) == 3 and len(group.node_ids) == 3
        assert list(_bundles(group)) == [{"CPU": 0.25, "train_node": 1.0}] * 3
    finally:
        group.shutdown()
    assert group.actors == []
    assert placement_group_table(group.placement_group)["state"] == "REMOVED"


def test_plain_group_has_no_rendezvous_and_shards_rows_contiguously(ray_cluster):
    group = WorkerGroup(Member, group_spec("wg-plain", 2, PlacementConfig(cpus=0.25), 0.0, "cpu"), "x")
    try:
        described = group.get(lambda actor, _: actor.describe.remote())
        assert [d["RANK"] for d in described] == [None, None] and group.node_ids == []
        rows = [7, 3, 9, 1, 5]
        refs = group.map_shards(rows, lambda actor, shard: actor.echo.remote(shard))
        assert ray.get(refs) == [[70, 30, 90], [10, 50]] == [[r * 10 for r in s] for s in shard_rows(rows, 2)]
        assert group.map_shards([4], lambda actor, shard: actor.echo.remote(shard)) != []
        assert len(group.map_shards([4], lambda actor, shard: actor.echo.remote(shard))) == 1  # empty shards skipped
    finally:
        group.shutdown()


def test_a_group_larger_than_the_cluster_fails_at_once_naming_the_role(ray_cluster):
    too_big = group_spec("wg-too-big", 4, PlacementConfig(cpus=64.0), 0.0, "cpu")
    with pytest.raises(PlacementError, match=r"wg-too-big: needs 256 CPU \(4 x 64\)"):
        WorkerGroup(Member, too_big, "x")
