"""GPU tier set-up: one Ray instance whose roles all share ONE physical GPU, the synthetic data, the results file.

Sharing one GPU is config: the engine takes `generator.placement.gpus` (a fraction), the learner
`learner.placement.gpus`, the reference `reference.placement.gpus`, so Ray gives every actor the same GPU. NCCL
refuses two ranks of one group on one GPU ("Duplicate GPU detected"), so the engine actor gets an NCCL host id
of its own (`generator.env_vars`, see test_gpu_tier.grpo_config): NCCL then treats learner and engine as two
hosts and moves the bytes through its socket transport (`NCCL_NET=Socket`), see docs/gpu.md.

Nothing here touches CUDA in the test process itself (only `torch.cuda.is_available()`, which creates no
context): the GPU belongs to the actors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Set for every actor (job-level runtime_env) and for the local raylet, which workers inherit from.
SHARED_GPU_ENV = {
    # The learner<->engine NCCL pair looks like two hosts (the engine's own NCCL_HOSTID): both must use
    # NCCL's built-in socket transport rather than probe for InfiniBand.
    "NCCL_NET": "Socket",
    "NCCL_DEBUG": "WARN",  # NCCL's own reason in the log when the one-shot GPU run fails there
}
ENGINE_NCCL_HOSTID = "rlhf-ray-gpu-tier-engine"
REPORT_KEY = pytest.StashKey[Path]()


def _table_module() -> Any:
    """tests/gpu/gpu_table.py, loaded by path (tests are not a package; pytest runs with importlib mode)."""
    spec = importlib.util.spec_from_file_location("rlhf_ray_gpu_table", Path(__file__).with_name("gpu_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- results ------------------------------------------------------------------------------------------------
class Report:
    """Appends one JSON record per configuration to the results file (`gpu_table.py` renders them)."""

    def __init__(self, path: Path):
        self.path = path

    def add(self, config: str, **figures: Any) -> None:
        record = {"config": config, **figures}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(f"[gpu] {json.dumps(record, default=str)}", flush=True)

    def run(self, config: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`run()` -> figures, recorded under `config` before any assertion looks at them; a failure is
        recorded too (so the table shows every configuration of a one-shot GPU run) and re-raised."""
        began = time.perf_counter()
        try:
            figures = run()
        except BaseException as err:
            self.add(config, error=f"{type(err).__name__}: {err}", wall_s=time.perf_counter() - began)
            raise
        figures["wall_s"] = time.perf_counter() - began
        self.add(config, **figures)
        return figures


@pytest.fixture(scope="session")
def report(request, tmp_path_factory) -> Report:
    """`$RLHF_RAY_GPU_REPORT` (set by scripts/gpu_check.sh, which prints the table itself), else a session
    file whose table this conftest prints at the end of the run."""
    path = Path(os.environ.get("RLHF_RAY_GPU_REPORT") or tmp_path_factory.mktemp("gpu-report") / "results.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    request.config.stash[REPORT_KEY] = path
    return Report(path)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    path = config.stash.get(REPORT_KEY, None)
    if path is None or os.environ.get("RLHF_RAY_GPU_REPORT"):
        return
    table = _table_module()
    terminalreporter.write_sep("=", "GPU tier")
    terminalreporter.write(table.render(table.load(path)))


# -- Ray on one GPU ------------------------------------------------------------------------------------------
def gpu_pids() -> set[int]:
    """Processes holding memory on any GPU (nvidia-smi); empty when nvidia-smi is missing or lists none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return set()
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {int(p) for p in out.stdout.split() if p.strip().isdigit()} if out.returncode == 0 else set()


@pytest.fixture(scope="module")
def gpu_ray():
    """A local Ray instance for the module: all CPUs and the GPUs this process sees (module scope: shut down
    before other tiers' tests start their own).

    Yields a function that waits until the previous run's actors have left the GPU: vLLM asserts at start-up
    that no other process frees GPU memory while it profiles, and a killed actor frees its memory a moment
    after `ray.kill` returns.
    """
    import ray

    from rlhf_ray.distributed.runtime import worker_env_vars

    if ray.is_initialized():
        pytest.skip("Ray already runs in this process (another tier's CPU cluster); run the GPU tier on its own: "
                    "bash scripts/gpu_check.sh or pytest tests/gpu")
    saved = {key: os.environ.get(key) for key in SHARED_GPU_ENV}
    actor_env = {**worker_env_vars("cuda"), **SHARED_GPU_ENV}
    os.environ.update(SHARED_GPU_ENV)
    baseline = gpu_pids()  # anything already on the GPU is not ours to wait for
    temp_dir = Path(tempfile.gettempdir()) / "rlhf_ray_gpu" / uuid.uuid4().hex[:8]
    temp_dir.mkdir(parents=True)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False, _temp_dir=str(temp_dir), log_to_driver=True,
             runtime_env={"env_vars": actor_env})

    def wait_for_gpu_release(timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := gpu_pids() - baseline):
            if time.monotonic() > deadline:
                warnings.warn(f"processes {sorted(left)} still hold GPU memory after {timeout_s:.0f} s; starting "
                              "anyway (vLLM may fail its start-up memory check)")
                return
            time.sleep(0.5)

    try:
        yield wait_for_gpu_release
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- data -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def gpu_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-tier")


@pytest.fixture(scope="session")
def synthetic_data(gpu_workdir) -> dict[str, Path]:
    """The project's synthetic SFT tasks (what `rlhf-ray synth-data` writes), reverse and sort only."""
    from rlhf_ray.data.synthetic import write_sft_dataset

    return write_sft_dataset(gpu_workdir / "data", tasks=("reverse", "sort"), n_train=2000, n_eval=64, seed=5)
