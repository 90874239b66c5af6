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
from typing import TYPE_CHECKING

import ray

from rlhf_ray.config import SyncConfig

if TYPE_CHECKING:  # the role modules import this one's siblings; the types are for reading only
    from rlhf_ray.roles.generator import GeneratorGroup
    from rlhf_ray.roles.learner import LearnerGroup


def wants_verification(verify: str, sync_index: int) -> bool:
    """Whether sync number `sync_index` (1 for the first) is checked, by `sync.verify` (never/first/every).
    Only a checked sync has the generators record checksums: summing every weight in float64 on every engine
    worker is a full pass over the model, not worth paying for a check nobody asked for."""
    if verify not in ("never", "first", "every"):
        raise ValueError(f"sync.verify={verify!r}: expected one of never, first, every")
    return verify == "every" or (verify == "first" and sync_index == 1)


class WeightSync:
    """Learner group -> generator group, through the two groups' typed methods (`LearnerGroup` sends,
    `GeneratorGroup` receives); set up once per run, then `sync()` after every update."""

    def __init__(self, cfg: SyncConfig, learners: LearnerGroup, generators: GeneratorGroup):
        self.cfg, self.learners, self.generators = cfg, learners, generators
        self.bucket_bytes = cfg.bucket_mb << 20  # the broadcast buckets, and the ZeRO-3 gathers behind them
        self.syncs = 0
        if cfg.transport == "collective":
            self._join_group(cfg.timeout_s)
        self.plan = learners.weight_plan(self.bucket_bytes)
        self.nbytes = sum(meta.nbytes for bucket in self.plan for meta in bucket)

    def _join_group(self, timeout_s: float) -> None:
        address, port = self.learners.sync_address()
        world = self.generators.sync_world_size
        ray.get(self.learners.init_weight_sync(address, port, world, timeout_s)
                + self.generators.init_weight_sync(address, port, timeout_s=timeout_s))

    def rejoin(self) -> None:
        """Form the broadcast group anew (learner rank 0 and every generator, at a fresh port) after a generator
        was replaced: a collective group cannot take in a new member. The next `sync()` then reaches it."""
        if self.cfg.transport == "collective":
            self._join_group(self.cfg.timeout_s)

    def sync(self) -> dict[str, float]:
        """Push the learners' current weights to every generator; returns seconds, MB, MB/s (and a check)."""
        began = time.perf_counter()
        self.syncs += 1
        check = wants_verification(self.cfg.verify, self.syncs)
        if self.cfg.transport == "collective":
            ray.get(self.learners.broadcast_weights(self.plan, self.bucket_bytes)
                    + self.generators.receive_weights(self.plan, check))
        else:
            # A ref: every generator reads the same stored bytes.
            self.generators.load_weights_from_bytes(self.learners.weights_bytes(self.bucket_bytes), check)
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
        got = self.generators.weights_checksums()
        bad = [i for i, c in enumerate(got) if c != expected]
        if bad:
            raise RuntimeError(f"weight sync check failed: generator(s) {bad} have checksum {got[bad[0]]!r}, "
                               f"learner has {expected!r}")
        return True
