"""The driver's side of weight sync: learner rank 0 -> every generator, by broadcast or object store.

Protocol (collective): the generators' workers and learner rank 0 form one broadcast group once (learner
rank 0 is rank 0 and hosts the store); each sync, the driver gets the bucket plan once, then starts the
learners' `broadcast_weights(plan)` and every generator's `receive_weights(plan)` together (both block in
the same broadcasts). Object store: learner rank 0 returns safetensors bytes (Ray stores them once) and every
generator loads them from the same ref.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from rlhf_ray.config import SyncConfig


class WeightSync:
    def __init__(self, cfg: SyncConfig, learners: Any, generators: Any):
        self.cfg, self.learners, self.generators = cfg, learners, generators
        self.plan: list = []
        self.syncs = 0
        if cfg.transport == "collective":
            self._join_group()
        self.plan = self.learners.group.get(lambda a, r: a.weight_plan.remote(cfg.bucket_mb << 20))[0]
        self.nbytes = sum(meta.nbytes for bucket in self.plan for meta in bucket)

    def _join_group(self) -> None:
        rank0 = self.learners.group.actors[0]
        _, address, port = ray.get(rank0.node_address.remote())
        workers = self.generators.workers_per_engine
        world = 1 + workers * len(self.generators.actors)
        calls = self.learners.group.map(lambda a, r: a.init_weight_sync.remote(address, port, world))
        calls += [g.init_weight_sync.remote(address, port, 1 + i * workers, world)
                  for i, g in enumerate(self.generators.actors)]
        ray.get(calls)

    def sync(self) -> dict[str, float]:
        """Push the learners' current weights to every generator; returns seconds, MB, MB/s (and a check)."""
        began = time.perf_counter()
        if self.cfg.transport == "collective":
            sends = self.learners.group.map(lambda a, r: a.broadcast_weights.remote(self.plan))
            receives = [g.receive_weights.remote(self.plan) for g in self.generators.actors]
            ray.get(sends + receives)
        else:
            blobs = self.learners.group.map(lambda a, r: a.weights_bytes.remote())
            ray.get(blobs[1:])
            data = blobs[0]  # a ref: each generator reads the same stored bytes
            ray.get([g.load_weights_from_bytes.remote(data) for g in self.generators.actors])
        seconds = time.perf_counter() - began
        self.syncs += 1
        mb = self.nbytes / 2**20
        metrics = {"sync/seconds": seconds, "sync/mb": mb, "sync/mb_per_s": mb / seconds}
        if self.cfg.verify == "every" or (self.cfg.verify == "first" and self.syncs == 1):
            metrics["sync/checksum_ok"] = float(self.verify())
        return metrics

    def verify(self) -> bool:
        """Every generator's weights checksum equals the learner's; raises if not (a broken sync)."""
        expected = self.learners.parameter_checksum()
        got = ray.get([g.weights_checksum.remote() for g in self.generators.actors])
        bad = [i for i, c in enumerate(got) if c != expected]
        if bad:
            raise RuntimeError(f"weight sync check failed: generator(s) {bad} have checksum {got[bad[0]]!r}, "
                               f"learner has {expected!r}")
        return True
