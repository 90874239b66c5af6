"""The driver SIGKILLed while a checkpoint is being written, then run.resume=auto (real Ray, DeepSpeed ZeRO-2).

The killed run is a real SFT driver in a subprocess that joins this session's Ray cluster. Its script (this
file, run as __main__) wraps `LearnerGroup.save_checkpoint` so that at the second checkpoint (step 4) a thread
SIGKILLs the driver as soon as the first file appears in the staging dir: the learners are still writing and the
driver never commits. The previous checkpoint (step 2) must be the one resumed, the half-written one removed,
metrics.jsonl must hold each step once (steps 3 and 4 were logged by the killed run), and the resumed losses must
equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import ray

from rlhf_ray.config import SFTConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.stages.common import read_metrics

COMMON = ["learner.zero_stage=2", "learner.num_ranks=2", "learner.micro_batch_size=8", "learner.lr=2e-3",
          "learner.warmup_steps=2", "learner.lr_schedule=cosine", "run.max_steps=6", "run.save_every=2",
          "run.keep_checkpoints=2", "run.log_every=1", "data.max_length=48", "eval.num_generate=0",
          "eval.at_start=false", "eval.num_print=0"]
KILL_AT_CHECKPOINT = 2  # the 2nd checkpoint: step 4 (save_every=2)


def sft_config(data: dict[str, str], out: Path, name: str, resume: str, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, None, [f"data.train={data['train']}", f"data.eval={data['eval']}",
                                         f"run.output_dir={out}", f"run.name={name}", f"run.resume={resume}",
                                         *COMMON, *extra])


# -- the killed driver (this file run as a script) ------------------------------------------------------------------
def _actor_pid(actor) -> int:
    return os.getpid()


def _kill_at_first_file(staging: Path, report: Path) -> None:
    """SIGKILL this process as soon as any file exists under `staging` (polled every millisecond: the learners
    write it, nothing here is told when), after noting what was there."""
    while not any(p.is_file() for p in staging.rglob("*")):
        time.sleep(0.001)
    seen = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    info = json.loads(report.read_text())
    report.write_text(json.dumps({**info, "files_at_kill": seen}))
    os.kill(os.getpid(), signal.SIGKILL)


def killed_driver(train: str, eval_: str, out: str, name: str, address: str, report: str) -> None:
    from rlhf_ray.stages.sft import run_sft

    original, calls = LearnerGroup.save_checkpoint, []

    def save_then_die(self, path):
        calls.append(path)
        if len(calls) < KILL_AT_CHECKPOINT:
            return original(self, path)
        # What must not outlive this driver: its learner actors (Ray's to kill) and any child of its own.
        actors = ray.get([a.__ray_call__.remote(_actor_pid) for a in self.group.actors])
        children = [p.pid for p in psutil.Process().children(recursive=True)]
        Path(report).write_text(json.dumps({"actor_pids": actors, "child_pids": children, "staging": str(path)}))
        killer = threading.Thread(target=_kill_at_first_file, args=(Path(path), Path(report)), daemon=True)
        killer.start()
        original(self, path)
        killer.join()  # never returns: files exist now, so the thread kills this process before any commit

    LearnerGroup.save_checkpoint = save_then_die
    run_sft(sft_config({"train": train, "eval": eval_}, Path(out), name, "never", f"run.ray_address={address}"))
    raise SystemExit("the driver was not killed")


if __name__ == "__main__":
    killed_driver(*sys.argv[1:])


# -- the test ---------------------------------------------------------------------------------------------------
def train_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if m["split"] == "train"]


def reap(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` s for `pids` to exit; kill (by pid) and return those still alive then."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        proc.kill()
    return [p.pid for p in alive]


def test_driver_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(ray_cluster, tmp_path, capfd):
    from rlhf_ray.data.synthetic import write_sft_dataset
    from rlhf_ray.stages.sft import run_sft

    data = {k: str(v) for k, v in write_sft_dataset(tmp_path / "data", tasks=("reverse",), n_train=200,
                                                     n_eval=16, seed=5).items()}
    full = run_sft(sft_config(data, tmp_path, "full", "never"))

    run_dir, report, log = tmp_path / "cut", tmp_path / "kill.json", tmp_path / "killed_driver.log"
    began = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, __file__, data["train"], data["eval"], str(tmp_path), "cut",
                               ray.get_runtime_context().gcs_address, str(report)],
                              stdout=out, stderr=subprocess.STDOUT, timeout=900)
    killed_s = time.perf_counter() - began
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-4000:]
    info = json.loads(report.read_text())
    leftovers = reap(info["child_pids"], 0) + reap(info["actor_pids"], 60)  # Ray ends a dead driver's actors
    assert leftovers == [], f"processes of the killed driver still alive: {leftovers}"

    # What the kill left: step 2 complete, step 4 half-written (no trainer_state.json), steps 3 and 4 logged.
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004.tmp"]
    assert info["staging"] == str(checkpoints / "step_00000004.tmp") and info["files_at_kill"]
    assert not (checkpoints / "step_00000004.tmp" / "trainer_state.json").exists()
    assert [s for s, _ in train_curve(run_dir)] == [1, 2, 3, 4]
    capfd.readouterr()

    began = time.perf_counter()
    run_sft(sft_config(data, tmp_path, "cut", "auto"))
    resumed_s = time.perf_counter() - began
    printed = capfd.readouterr().out
    assert "removed" in printed and "step_00000004.tmp" in printed
    assert f"resumed from {checkpoints / 'step_00000002'} at step 2" in printed
    assert json.loads((run_dir / "resume.json").read_text())["step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004", "step_00000006"]

    expected, got = train_curve(full.run_dir), train_curve(run_dir)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]  # each step once
    assert [m["step"] for m in read_metrics(run_dir) if m["split"] == "eval"] == [6]
    assert expected[-1][1] != expected[0][1]  # the parameters did move
    for (step, a), (_, b) in zip(expected, got):
        assert math.isclose(a, b, rel_tol=1e-5), (step, expected, got)
    print(f"\n[checkpoint-kill] files at the kill: {info['files_at_kill']}; killed run {killed_s:.1f} s; "
          f"resumed run (steps 3-6 + final eval) {resumed_s:.1f} s")
