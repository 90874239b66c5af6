"""One small helper that places N Ray actors of one role, gives them ranks and fans calls out to them.

Every role is a `WorkerGroup` of one actor class: the learner groups (policy, critic, a supervised stage's
learner), the vLLM generators, the reference and reward actors. Placement goes through a placement group (one
bundle per worker: CPU locally, CPU+GPU on a cluster), so a role's workers are reserved together or not at
all. A role that is one torch.distributed job (`distributed=True`: the DeepSpeed learners) also gets a
rendezvous: rank 0 picks its node address and a free port; every actor then sets MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK.

Calls are made through the actors' real methods: `group.map(lambda actor, rank: actor.save.remote(path))`.
Rows are split among workers by `shard_rows`, the one sharding rule of the project.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.config.base import PlacementConfig
from rlhf_ray.utils.logs import actor_runtime_env

A = TypeVar("A")


class PlacementError(RuntimeError):
    """The cluster cannot (or did not in time) provide what a group asked for."""


@dataclass(frozen=True)
class GroupSpec:
    """How many ranks a group has and what each reserves."""

    name: str
    num_workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: str = "PACK"
    ready_timeout_s: float = 120.0
    # Custom resources each worker also reserves, e.g. {"node_group_a": 1} to pin a role to labelled nodes.
    resources: tuple[tuple[str, float], ...] = ()

    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.cpus_per_worker, **dict(self.resources)}
        if self.gpus_per_worker > 0:
            bundle["GPU"] = self.gpus_per_worker
        return [dict(bundle) for _ in range(self.num_workers)]


def group_spec(name: str, num_workers: int, placement: PlacementConfig, gpus: float, device: str) -> GroupSpec:
    """The `GroupSpec` of a role from its config's `placement` section; `gpus` is what each worker reserves on
    CUDA (the role's resolved default when placement.gpus is null), none on CPU."""
    return GroupSpec(name=name, num_workers=num_workers, cpus_per_worker=placement.cpus,
                     gpus_per_worker=gpus if device == "cuda" else 0.0, strategy=placement.strategy,
                     resources=tuple(sorted(placement.resources.items())))


def shard_rows(rows: Sequence[int], parts: int) -> list[list[int]]:
    """`rows` cut into `parts` contiguous shards whose sizes differ by at most one (concatenating the shards
    gives `rows` back, so per-worker results joined in worker order keep the order of `rows`)."""
    base, extra = divmod(len(rows), parts)
    shards, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        shards.append([int(r) for r in rows[start:start + size]])
        start += size
    return shards


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class DistributedWorker:
    """Base of every actor that is one rank of a torch.distributed job."""

    rank: int = 0
    world_size: int = 1

    def node_address(self) -> tuple[str, str, int]:
        """(node id, IP address, a free port) of this actor; rank 0's become the rendezvous point."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), _free_port()

    def set_distributed_env(self, rank: int, world_size: int, local_rank: int, master_addr: str,
                            master_port: int) -> None:
        self.rank, self.world_size = rank, world_size
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))

    def ping(self) -> int:
        return self.rank


class WorkerGroup(Generic[A]):
    """N actors of `actor_cls` in one placement group (bundle i holds rank i); with `distributed`, ranks and
    rendezvous are set up for one torch.distributed job (the actor class is then a `DistributedWorker`).

    Every actor gets `*args, **kwargs`, plus `rank_kwargs(rank)` when given (e.g. a per-engine seed).
    """

    def __init__(self, actor_cls: type, spec: GroupSpec, *args: Any, runtime_env: Optional[dict] = None,
                 placement: Optional[PlacementGroup] = None, distributed: bool = False,
                 rank_kwargs: Optional[Callable[[int], dict[str, Any]]] = None, **kwargs: Any):
        self.spec = spec
        self._owns_placement = placement is None
        self.placement_group = placement or reserve(spec)
        self._remote_cls = actor_cls if hasattr(actor_cls, "remote") else ray.remote(actor_cls)
        self._runtime_env = actor_runtime_env(runtime_env)  # the run's log level (run.log_level) for every role
        self._args, self._kwargs, self._rank_kwargs = args, kwargs, rank_kwargs
        self.actors: list[A] = [self._create(i) for i in range(spec.num_workers)]
        self.node_ids: list[str] = []
        self._start_call: Optional[Callable[[A, int], ray.ObjectRef]] = None
        self._started: list[ray.ObjectRef] = []
        self.info: list[Any] = []
        if distributed:
            self._rendezvous()

    def _create(self, rank: int) -> A:
        """Actor `rank` in bundle `rank` of the group's placement group."""
        return self._remote_cls.options(
            num_cpus=self.spec.cpus_per_worker, num_gpus=self.spec.gpus_per_worker, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group,
                                                                 placement_group_bundle_index=rank),
            runtime_env=self._runtime_env,
        ).remote(*self._args, **self._kwargs, **(self._rank_kwargs(rank) if self._rank_kwargs else {}))

    def start(self, call: Callable[[A, int], ray.ObjectRef]) -> None:
        """Start each worker's set-up call (`call(actor, rank)`) without waiting; `ready()` waits for it."""
        self._start_call = call
        self._started, self.info = self.map(call), []

    def ready(self) -> list[Any]:
        """The results of the calls `start` began (waited for once, then kept in `info`)."""
        if self._started and not self.info:
            self.info = ray.get(self._started)
        return self.info

    def restart(self, rank: int) -> None:
        """Replace actor `rank` (dead or hung) by a new one in the same placement bundle, built with the same
        arguments, and wait until it is up (its `start` call too). Not for a torch.distributed group: its other
        ranks hold a process group that the new rank cannot join."""
        if self.node_ids:
            raise RuntimeError(f"{self.spec.name}: a rank of a torch.distributed group cannot be restarted alone")
        ray.kill(self.actors[rank], no_restart=True)  # a hung actor is still running: end it first
        self.actors[rank] = self._create(rank)
        if self._start_call is not None:
            info = ray.get(self._start_call(self.actors[rank], rank))
            if self.info:
                self.info[rank] = info
        else:
            ray.get(self.actors[rank].__ray_ready__.remote())

    def __len__(self) -> int:
        return len(self.actors)

    def _rendezvous(self) -> None:
        addresses = ray.get([a.node_address.remote() for a in self.actors])
        _, master_addr, master_port = addresses[0]
        seen_on_node: dict[str, int] = {}
        calls = []
        for rank, (actor, (node_id, _, _)) in enumerate(zip(self.actors, addresses)):
            local_rank = seen_on_node.get(node_id, 0)
            seen_on_node[node_id] = local_rank + 1
            if self.spec.gpus_per_worker > 0:
                local_rank = 0  # Ray isolates each rank's GPU: it is device 0 inside the actor
            calls.append(actor.set_distributed_env.remote(rank, len(self.actors), local_rank, master_addr,
                                                          master_port))
        ray.get(calls)
        self.node_ids = [node_id for node_id, _, _ in addresses]

    def map(self, call: Callable[[A, int], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Start `call(actor, rank)` on every rank; returns the refs in rank order."""
        return [call(actor, rank) for rank, actor in enumerate(self.actors)]

    def get(self, call: Callable[[A, int], ray.ObjectRef]) -> list[Any]:
        """`map`, then wait for all results."""
        return ray.get(self.map(call))

    def wait_started(self) -> None:
        """Block until every actor's constructor has finished (raises its error if one failed)."""
        ray.get([actor.__ray_ready__.remote() for actor in self.actors])

    def map_shards(self, rows: Sequence[int],
                   call: Callable[[A, list[int]], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Start `call(actor, shard)` on every worker with a non-empty shard of `rows` (`shard_rows`); returns
        the refs in worker order."""
        return [call(actor, shard) for actor, shard in zip(self.actors, shard_rows(rows, len(self.actors)))
                if shard]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._owns_placement:
            remove_placement_group(self.placement_group)


def describe_resources() -> str:
    total = ray.cluster_resources()
    free = ray.available_resources()
    keys = sorted(k for k in total if not k.startswith(("node:", "object_", "bundle_")) and "_group_" not in k
                  and k not in ("memory",))
    return ", ".join(f"{k} {free.get(k, 0):g} free of {total[k]:g}" for k in keys)


def reserve(spec: GroupSpec) -> PlacementGroup:
    """A ready placement group for `spec`, or a `PlacementError` saying what is missing."""
    check_fits(spec)
    pg = placement_group(spec.bundles(), strategy=spec.strategy, name=f"rlhf_ray/{spec.name}")
    try:
        ray.get(pg.ready(), timeout=spec.ready_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise PlacementError(
            f"{spec.name}: placement of {spec.num_workers} x {spec.bundles()[0]} ({spec.strategy}) not ready "
            f"after {spec.ready_timeout_s:.0f} s; cluster: {describe_resources()}") from None
    return pg


def check_total(needs: dict[str, dict[str, float]]) -> None:
    """Fail at once when the roles together need more CPUs/GPUs than the cluster has in all.

    `needs` maps a role to its resources, e.g. {"learner": {"CPU": 2, "GPU": 2}, "generators": {...}}.
    """
    total = ray.cluster_resources()
    for resource in ("CPU", "GPU"):
        need = sum(role.get(resource, 0.0) for role in needs.values())
        if need > total.get(resource, 0.0) + 1e-9:
            parts = ", ".join(f"{name} {role[resource]:g}" for name, role in needs.items() if role.get(resource))
            raise PlacementError(f"the roles need {need:g} {resource} in all ({parts}) but the cluster has "
                                 f"{total.get(resource, 0):g}; cluster: {describe_resources()}")


def pack_bundles(specs: list[GroupSpec], nodes: list[dict[str, float]]) -> list[str]:
    """Place every bundle of `specs` on `nodes` (resource dicts, e.g. {"GPU": 8, "train_node": 8}), largest GPU
    demand first, each on the first node with room; returns what did not fit ("role: bundle"), empty when all
    fit. A plan check for configs (Ray's own placement is what runs), so a preset can be checked against the
    cluster shape it names without that cluster."""
    free = [dict(node) for node in nodes]
    bundles = [(spec.name, bundle) for spec in specs for bundle in spec.bundles()]
    bundles.sort(key=lambda item: -item[1].get("GPU", 0.0))
    unplaced = []
    for name, bundle in bundles:
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
        if node is None:
            unplaced.append(f"{name}: {_fmt(bundle)}")
            continue
        for key, value in bundle.items():
            node[key] -= value
    return unplaced


def check_fits(spec: GroupSpec) -> None:
    """Fail at once when the cluster lacks what `spec` needs (not wait forever): in all, and per worker on
    one node (a worker's bundle never spans nodes, e.g. a tensor-parallel engine's GPUs)."""
    total = ray.cluster_resources()
    bundle = spec.bundles()[0]
    for resource, per_worker in bundle.items():
        need = per_worker * spec.num_workers
        if need > total.get(resource, 0.0) + 1e-9:
            raise PlacementError(
                f"{spec.name}: needs {need:g} {resource} ({spec.num_workers} x {per_worker:g}) but the cluster "
                f"has {total.get(resource, 0):g} in all; cluster: {describe_resources()}")
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if nodes and not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
        largest = {k: max(node.get(k, 0.0) for node in nodes) for k in bundle}
        raise PlacementError(
            f"{spec.name}: each worker needs {_fmt(bundle)} on one node, but no node has that "
            f"(largest per resource: {_fmt(largest)}); cluster: {describe_resources()}")
    if spec.strategy.startswith("STRICT_PACK"):
        whole = {k: v * spec.num_workers for k, v in bundle.items()}
        if nodes and not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in whole.items()) for node in nodes):
            raise PlacementError(f"{spec.name}: STRICT_PACK needs {_fmt(whole)} on one node, but no node has "
                                 f"that; cluster: {describe_resources()}")


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items())
