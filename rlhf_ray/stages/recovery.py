"""Keeping an RLHF run going when one of its actors dies or hangs.

A generator, reference or reward actor holds no training state: when one dies (its node was preempted, its
process ran out of memory) or one of its calls outlives `reward.timeout_s` / `reference.timeout_s`, the driver
replaces it in its own placement bundle, gives a new generator the current weights (the broadcast group is
formed anew), and retries what failed. The retried step is the same step: its prompts and sampling seeds are
a function of the step number, so a retried step produces what the first attempt would have, and no step is
lost. The metrics of the step say what was restarted (`restarts/<role>`, `restarts/seconds`).

A learner or critic rank cannot be replaced alone (its peers hold a DeepSpeed process group and ZeRO shards
of the model and optimizer): the run stops, naming the rank and the last checkpoint, from which
`run.resume=auto` continues the same curve.

What is not an actor failure (a reward function raising, a bad row) is not retried: it is raised as it was.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import ray
from tqdm.auto import tqdm

from rlhf_ray.distributed.worker_group import shard_rows
from rlhf_ray.stages.stops import RoleLostError

if TYPE_CHECKING:
    from rlhf_ray.stages.common import RunDir
    from rlhf_ray.stages.rlhf_roles import Roles

T = TypeVar("T")

RESTARTABLE = ("generator", "reference", "reward")
# How long a health check waits for an actor's answer. A dead actor answers at once (with its death); one
# still busy with a call of the failed step does not answer in time and is taken as alive.
PROBE_SECONDS = 10.0


class ScorerTimeout(RuntimeError):
    """Calls of a scoring role outlived its timeout: the actors that made them are taken as hung."""

    def __init__(self, role: str, ranks: Sequence[int], seconds: float):
        self.role, self.ranks, self.seconds = role, list(ranks), seconds
        super().__init__(f"{role} actor(s) {self.ranks}: no answer within {role}.timeout_s={seconds:g} s")


def get_fail_fast(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """`ray.get(refs)`, but raising the first failure as soon as it happens: the error of a dead learner rank
    must not wait behind its peer, which blocks in a collective with the dead rank until a timeout."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)
        ray.get(ready)  # raises that ref's error, if it failed
    return ray.get(list(refs))


def shard_ranks(num_rows: int, num_actors: int) -> list[int]:
    """The ranks that `WorkerGroup.map_shards` calls for `num_rows` rows (those with a non-empty shard), in
    the order of the refs it returns."""
    return [rank for rank, shard in enumerate(shard_rows(list(range(num_rows)), num_actors)) if shard]


def wait_within(role: str, refs: Sequence[ray.ObjectRef], ranks: Sequence[int], timeout_s: Optional[float],
                began: float) -> None:
    """Wait for a role's calls (`refs`, made by actors `ranks`) until `timeout_s` after `began`
    (`time.monotonic()` when they started); `ScorerTimeout` names the ranks still running then."""
    if not refs:
        return
    left = None if timeout_s is None else max(0.0, timeout_s - (time.monotonic() - began))
    _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=left, fetch_local=False)
    if pending:
        stuck = set(pending)
        raise ScorerTimeout(role, [rank for ref, rank in zip(refs, ranks) if ref in stuck], timeout_s or 0.0)


class Recovery:
    """Runs the driver's calls on the roles, replacing dead or hung generator/reference/reward actors and
    retrying (at most `max_restarts` times per call), and stopping with a clear message when a learner or
    critic rank died. `metrics()` gives what was restarted since it was last called."""

    def __init__(self, roles: Roles, run_dir: RunDir, max_restarts: int):
        self.roles, self.run_dir, self.max_restarts = roles, run_dir, max_restarts
        self.total = 0
        self.generator_restarts = 0
        self._counts: dict[str, float] = {}

    def run(self, what: str, fn: Callable[[], T], retry: bool = True) -> T:
        """`fn()`; when it fails for a dead or hung actor, replace the actor and (with `retry`) call `fn` again.
        `what` names the call in messages ("step 3", "evaluation at step 10")."""
        failures = 0
        while True:
            try:
                return fn()
            except (ray.exceptions.RayError, ScorerTimeout) as err:
                failures += 1
                failed = self._failed_actors(err, what)
                if not failed:
                    raise  # not an actor failure: the call's own error
                if failures > self.max_restarts:
                    role, rank, cause = failed[0]
                    raise RoleLostError(
                        f"{what}: {role} {rank} failed again ({cause}) after {self.max_restarts} restart(s) in this "
                        f"call (run.max_restarts={self.max_restarts}); stopping. {self._resume_hint()}") from err
                self._replace(failed, what)
                if not retry:
                    raise

    def metrics(self) -> dict[str, float]:
        """restarts/<role> and restarts/seconds since the last call, and restarts/total of the run."""
        out, self._counts = self._counts, {}
        return {**out, "restarts/total": float(self.total)}

    # -- internals ------------------------------------------------------------------------------------------
    def _groups(self) -> dict[str, Any]:
        roles = self.roles
        groups = {"policy learner": roles.learners.group, "critic": roles.critic.group if roles.critic else None,
                  "generator": roles.generators.group, "reference": roles.reference, "reward": roles.reward}
        return {name: group for name, group in groups.items() if group is not None}

    def _failed_actors(self, err: BaseException, what: str) -> list[tuple[str, int, str]]:
        """(role, rank, cause) of every dead actor, and of the hung ones `err` names; raises `RoleLostError`
        when a learner or critic rank is among the dead."""
        failed = [(err.role, rank, f"hung: no answer within {err.seconds:g} s") for rank in err.ranks] \
            if isinstance(err, ScorerTimeout) else []
        for role, group in self._groups().items():
            pings = [actor.__ray_ready__.remote() for actor in group.actors]
            ready, _ = ray.wait(pings, num_returns=len(pings), timeout=PROBE_SECONDS, fetch_local=False)
            done = set(ready)
            for rank, ping in enumerate(pings):
                if ping not in done:
                    continue  # busy with a call of the failed step: alive
                try:
                    ray.get(ping)
                except ray.exceptions.RayActorError as death:
                    cause = f"died: {type(death).__name__}"
                    if role not in RESTARTABLE:
                        raise RoleLostError(f"{what}: {role} rank {rank} {cause}; a learner rank cannot be replaced "
                                            f"alone, so the run stops. {self._resume_hint()}") from err
                    if (role, rank) not in {(r, k) for r, k, _ in failed}:
                        failed.append((role, rank, cause))
        return failed

    def _replace(self, failed: list[tuple[str, int, str]], what: str) -> None:
        began = time.perf_counter()
        groups = self._groups()
        for role, rank, _ in failed:
            groups[role].restart(rank)
            self._counts[f"restarts/{role}"] = self._counts.get(f"restarts/{role}", 0.0) + 1
            self.total += 1
        if any(role == "generator" for role, _, _ in failed):
            self.generator_restarts += 1
            self.roles.sync.rejoin()  # a new member: the broadcast group is formed anew
            self.roles.sync.sync()  # the current weights (the replaced engine started from policy.path)
        seconds = time.perf_counter() - began
        self._counts["restarts/seconds"] = self._counts.get("restarts/seconds", 0.0) + seconds
        names = ", ".join(f"{role} {rank} ({cause})" for role, rank, cause in failed)
        tqdm.write(f"[rlhf] {what}: {names}; replaced in {seconds:.1f} s, retrying")

    def _resume_hint(self) -> str:
        checkpoints = self.run_dir.list_checkpoints()
        if not checkpoints:
            return "No checkpoint was written yet: run.resume=auto starts the run over."
        return f"Last checkpoint: {checkpoints[-1]}; run again with run.resume=auto to continue from it."
