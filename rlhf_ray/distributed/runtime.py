"""Starting or joining Ray, and the environment every worker gets (through `runtime_env`, never at import)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Optional

import ray

from rlhf_ray.models.tiny import cache_dir
from rlhf_ray.utils.logs import log_level_scope, ray_driver_level, worker_log_env


def worker_env_vars(device: str) -> dict[str, str]:
    """Environment for every actor of a run: op-build cache, accelerator choice, quiet tokenizers."""
    env = {
        # DeepSpeed compiles its CPU ops (shm comm, cpu_adam) on first use; cache them once per machine.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(cache_dir() / "torch_extensions"),
        "RLHF_RAY_CACHE": str(cache_dir()),
        "TOKENIZERS_PARALLELISM": "false",
        # Arrow batches are zero-copy anyway; torch tensors (weights) are too with this set.
        "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
    }
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    elif device == "cuda":
        env["DS_ACCELERATOR"] = "cuda"
    return env


def cluster_device(requested: str) -> str:
    """`auto` -> cuda when the Ray cluster has GPUs, else cpu."""
    if requested != "auto":
        return requested
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def _local_temp_dir() -> str:
    # Ray's unix socket paths must stay short (about 107 bytes), so not under a deep project path.
    path = Path(tempfile.gettempdir()) / "rlhf_ray" / uuid.uuid4().hex[:8]
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# Ray's GCS keeps the event record of the last 100,000 tasks (Ray 2.60's default); a run makes ~10 tasks and
# calls per step, so a local instance's gcs_server grew by ~46 KB a step for ~10,000 steps (measured by
# scripts/soak_rlhf.py: +52% RSS over 800 steps, still +47% with a 10,000 cap, flat with 2,000). The last
# 2,000 tasks (some 200 steps) are plenty to inspect. A cluster's own setting
# (RAY_task_events_max_num_task_in_gcs on its head) applies to runs that join it.
LOCAL_SYSTEM_CONFIG = {"task_events_max_num_task_in_gcs": 2_000}


@contextlib.contextmanager
def ray_session(address: Optional[str], num_cpus: Optional[int] = None, device: str = "auto",
                log_level: str = "info") -> Iterator[None]:
    """Use the Ray already initialised in this process, else join `address` (or `$RAY_ADDRESS`, which a Ray
    job's entrypoint has), else start a local instance.

    A local instance gets its own temp dir and `address="local"`, so it never attaches to another cluster on
    the machine; it is shut down on exit (only what this call started). `log_level` (`run.log_level`) applies
    to the driver and to every actor created inside (`rlhf_ray.utils.logs`).
    """
    with log_level_scope(log_level):
        if ray.is_initialized():
            yield
            return
        with _own_ray(address, num_cpus, device, log_level):
            yield


@contextlib.contextmanager
def _own_ray(address: Optional[str], num_cpus: Optional[int], device: str, log_level: str) -> Iterator[None]:
    env = {"env_vars": {**worker_env_vars("cpu" if device == "cpu" else device), **worker_log_env(log_level)}}
    # Inside `ray job submit` Ray sets RAY_ADDRESS for the entrypoint: join that cluster. The job's own
    # runtime_env (working_dir, env_vars) then applies; every actor adds its env_vars on top.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=ray_driver_level(log_level))
    else:
        cpus = max(num_cpus or os.cpu_count() or 1, 1)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=_local_temp_dir(),
                 runtime_env=env, log_to_driver=True, logging_level=ray_driver_level(log_level),
                 _system_config=LOCAL_SYSTEM_CONFIG)
    try:
        yield
    finally:
        ray.shutdown()
