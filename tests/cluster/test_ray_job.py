"""`ray start --head` + `ray job submit`, as users run it: real head, token auth, the tiny pipeline.

The head gets its own temp dir, ports and auth token; it is stopped by the process ids of exactly the
processes under that temp dir (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from rlhf_ray.data.synthetic import write_feedback_datasets, write_sft_dataset

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_pids(marker: str) -> list[int]:
    """Processes whose command line names our temp dir: the head's GCS, raylet, dashboard, workers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return [p for p in pids if p != os.getpid()]


@pytest.fixture(scope="module")
def head():
    temp = tempfile.mkdtemp(prefix="rrjob_", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    args = [RAY, "start", "--head", f"--temp-dir={temp}", "--num-cpus=6", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
    subprocess.run(args, env=env, check=True, capture_output=True, text=True, timeout=120)
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "temp": Path(temp)}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in own_pids(temp):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)


def ray_job(head, command: str, *args: str, check: bool = True) -> str:
    proc = subprocess.run([RAY, "job", command, "--address", head["address"], *args], env=head["env"],
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def submit(head, job_id: str, *entrypoint: str) -> None:
    excludes = [".venv", ".cache", ".git", "runs", "data/generated", "tests/artifacts"]
    ray_job(head, "submit", "--submission-id", job_id, "--no-wait", "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps({"excludes": excludes}), "--", *entrypoint)


def wait(head, job_id: str, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        # `ray job status` ends with "Job 'ID' succeeded" / "failed" / "stopped" once the job is over
        found = re.search(r"Job '[^']*' (succeeded|failed|stopped)", ray_job(head, "status", job_id, check=False))
        if found:
            return found.group(1).upper()
        time.sleep(3)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_pipeline_job_succeeds_and_writes_its_outputs(head, tmp_path):
    data = tmp_path / "data"
    sft = write_sft_dataset(data, tasks=("reverse", "sort"), n_train=400, n_eval=16)
    feedback = write_feedback_datasets(data, tasks=("sort",), n_train=200, n_eval=16)
    out = tmp_path / "runs"
    submit(head, "pipeline-ok", "python", "jobs/pipeline.py", "configs/tiny-cpu/pipeline.yaml",
           f"sft.data.train={sft['train']}", f"sft.data.eval={sft['eval']}", "sft.run.max_steps=10",
           f"sft.run.output_dir={out}", "sft.eval.num_generate=8",
           f"rm.data.train={feedback['pairwise_train']}", f"rm.data.eval={feedback['pairwise_eval']}",
           "rm.run.max_steps=10", f"rm.run.output_dir={out}",
           f"rlhf.data.train={sft['train']}", f"rlhf.data.eval={sft['eval']}", "rlhf.run.max_steps=2",
           "rlhf.run.eval_every=0", "rlhf.run.save_every=0", "rlhf.run.save_rollouts_every=0",
           "rlhf.eval.num_generate=8", f"rlhf.run.output_dir={out}")
    state = wait(head, "pipeline-ok")
    logs = ray_job(head, "logs", "pipeline-ok")
    assert state == "SUCCEEDED", logs[-4000:]
    assert "held-out prompts, greedy answers" in logs  # the before/after table
    for stage in ("pipeline-sft", "pipeline-rm", "pipeline-rlhf"):
        assert (out / stage / "model" / "config.json").is_file(), stage
        assert (out / stage / "metrics.jsonl").is_file()


def test_a_job_with_a_bad_config_fails_with_the_error_in_its_logs(head, tmp_path):
    submit(head, "bad-config", "python", "jobs/sft.py", "configs/tiny-cpu/sft.yaml", "learner.zero_stage=9")
    assert wait(head, "bad-config", timeout=180) == "FAILED"
    assert "learner.zero_stage: must be <= 3, got 9" in ray_job(head, "logs", "bad-config")
