"""The driver's side of weight sync: learner rank 0 -> every generator, by broadcast or object store.

Protocol (collective): the generators' workers and learner rank 0 form one broadcast group once (learner
rank 0 is rank 0 and hosts the store); each sync, the driver gets the bucket plan once, then starts the
learners' `broadcast_weights(plan)` and every generator's `receive_weights(plan)` together (both block in
the same broadcasts). Object store: learner rank 0 returns safetensors bytes (Ray stores them once) and every
generator loads them from the same ref. Checksums are computed on either side only for a sync that
`sync.verify` asks to check.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from rlhf_ray.config import SyncConfig


def wants_verification(verify: str, sync_index: int) -> bool:
    """Whether sync number `sync_index` (1 for the first) is checked, by `sync.verify` (never/first/every).
    Only a checked sync has the generators record checksums: summing every weight in float64 on every engine
    worker is a full pass over the model, not worth paying for a check nobody asked for."""
    if verify not in ("never", "first", "every"):
        raise ValueError(f"sync.verify={verify!r}: expected one of never, first, every")
    return verify == "every" or (verify == "first" and sync_index == 1)


class WeightSync:
    def __init__(self, cfg: SyncConfig, learners: Any, generators: Any):
        self.cfg, self.learners, self.generators = cfg, learners, generators
        self.bucket_bytes = cfg.bucket_mb << 20  # the broadcast buckets, and the ZeRO-3 gathers behind them
        self.plan: list = []
        self.syncs = 0
        if cfg.transport == "collective":
            self._join_group(cfg.timeout_s)
        self.plan = self.learners.group.get(lambda a, r: a.weight_plan.remote(self.bucket_bytes))[0]
        self.nbytes = sum(meta.nbytes for bucket in self.plan for meta in bucket)

    def _join_group(self, timeout_s: float) -> None:
        rank0 = self.learners.group.actors[0]
        _, address, port = ray.get(rank0.node_address.remote())
        workers = self.generators.workers_per_engine
        world = 1 + workers * len(self.generators.actors)
        calls = self.learners.group.map(lambda a, r: a.init_weight_sync.remote(address, port, world, timeout_s))
        calls += [g.init_weight_sync.remote(address, port, 1 + i * workers, world, timeout_s=timeout_s)
                  for i, g in enumerate(self.generators.actors)]
        ray.get(calls)

    def sync(self) -> dict[str, float]:
        """Push the learners' current weights to every generator; returns seconds, MB, MB/s (and a check)."""
        began = time.perf_counter()
        self.syncs += 1
        check = wants_verification(self.cfg.verify, self.syncs)
        if self.cfg.transport == "collective":
            sends = self.learners.group.map(lambda a, r: a.broadcast_weights.remote(self.plan, self.bucket_bytes))
            receives = [g.receive_weights.remote(self.plan, check) for g in self.generators.actors]
            ray.get(sends + receives)
        else:
            blobs = self.learners.group.map(lambda a, r: a.weights_bytes.remote(self.bucket_bytes))
            ray.get(blobs[1:])
            data = blobs[0]  # a ref: each generator reads the same stored bytes
            ray.get([g.load_weights_from_bytes.remote(data, check) for g in self.generators.actors])
        seconds = time.perf_counter() - began
        mb = self.nbytes / 2**20
        metrics = {"sync/seconds": seconds, "sync/mb": mb, "sync/mb_per_s": mb / seconds}
        if check:
            metrics["sync/checksum_ok"] = float(self.verify())
        return metrics

    def verify(self) -> bool:
        """Every generator's weights checksum equals the learner's; raises if not (a broken sync). Only after a
        sync that recorded checksums (`wants_verification`)."""
        expected = self.learners.parameter_checksum(self.bucket_bytes)
        got = ray.get([g.weights_checksum.remote() for g in self.generators.actors])
        bad = [i for i, c in enumerate(got) if c != expected]
        if bad:
            raise RuntimeError(f"weight sync check failed: generator(s) {bad} have checksum {got[bad[0]]!r}, "
                               f"learner has {expected!r}")
        return True
