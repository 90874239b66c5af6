"""Ctrl-C in the middle of a real SFT step (learner group on Ray, DeepSpeed ZeRO-2), then run.resume=auto.

The SIGINT is sent by a Ray task to the driver while the driver blocks in `ray.get`, after the learners have
applied the step's update: exactly the moment at which a checkpoint labelled with the previous step would
already hold the new weights. The resumed run must continue the uninterrupted run's loss curve.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from rlhf_ray.config import SFTConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.synthetic import write_sft_dataset
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.stages.common import read_metrics
from rlhf_ray.stages.sft import run_sft

# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

COMMON = ["learner.zero_stage=2", "learner.num_ranks=2", "learner.micro_batch_size=8", "learner.lr=2e-3",
          "learner.warmup_steps=2", "learner.lr_schedule=cosine", "run.max_steps=5", "run.log_every=1",
          "data.max_length=48", "eval.num_generate=0", "eval.at_start=false", "eval.num_print=0"]


def sft_config(data: dict[str, Path], out: Path, name: str, resume: str) -> SFTConfig:
    return load_config(SFTConfig, None, [f"data.train={data['train']}", f"data.eval={data['eval']}",
                                         f"run.output_dir={out}", f"run.name={name}", f"run.resume={resume}",
                                         *COMMON])


def train_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if m["split"] == "train"]


def send_sigint(pid: int) -> None:
    os.kill(pid, signal.SIGINT)


@contextlib.contextmanager
def sigint_after_update(monkeypatch, nth: int, method: str = "train_step") -> Iterator[list[int]]:
    """A real SIGINT to this (driver) process, sent by a Ray task right after the `nth` learner update returns;
    yields the list of updates made. `method`: the LearnerGroup method the stage updates through
    (`start_train_step`, which returns refs, is waited on first: the update has then been applied)."""
    original, calls = getattr(LearnerGroup, method), []

    def interrupted_train_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if isinstance(result, list):
            ray.get(result)  # the learners have applied this update
        calls.append(len(calls))
        if len(calls) == nth:
            ray.get(ray.remote(num_cpus=0)(send_sigint).remote(os.getpid()))
        return result

    monkeypatch.setattr(LearnerGroup, method, interrupted_train_step)
    try:
        yield calls
    finally:
        monkeypatch.setattr(LearnerGroup, method, original)


def test_ctrl_c_mid_step_then_resume_continues_the_same_curve(ray_cluster, tmp_path, monkeypatch):
    data = write_sft_dataset(tmp_path / "data", tasks=("reverse",), n_train=200, n_eval=16, seed=5)
    full = run_sft(sft_config(data, tmp_path, "full", "never"))

    # Ctrl-C while the driver blocks in ray.get, in the middle of step 3 (after the learners' update).
    with pytest.raises(KeyboardInterrupt), sigint_after_update(monkeypatch, 3) as calls:
        run_sft(sft_config(data, tmp_path, "cut", "never"))
    run_dir = tmp_path / "cut"
    assert len(calls) == 3  # nothing ran after the interrupted step
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003"]
    assert not (run_dir / "model").exists()

    run_sft(sft_config(data, tmp_path, "cut", "auto"))
    expected, got = train_curve(full.run_dir), train_curve(run_dir)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4, 5]
    assert expected[-1][1] != expected[0][1]  # the parameters did move
    for (step, a), (_, b) in zip(expected, got):
        assert math.isclose(a, b, rel_tol=1e-5), (step, expected, got)


def rlhf_config(data: dict[str, Path], out: Path, name: str, resume: str):
    from rlhf_ray.config import RLHFConfig

    return load_config(RLHFConfig, Path("configs/tiny-cpu/rlhf.yaml"), [
        "policy.path=tiny:tiny", f"data.train={data['train']}", f"data.eval={data['eval']}",
        "eval.num_generate=4", f"run.output_dir={out}", f"run.name={name}", f"run.resume={resume}",
        "reward.functions=[{path: 'rlhf_ray.rewards.tasks:task_score'}]", "algorithm.advantage=grpo",
        "algorithm.prompts_per_step=4", "generator.samples_per_prompt=2", "generator.max_new_tokens=6",
        "generator.cpu_kv_cache_gib=0.125", "learner.micro_batch_size=4", "learner.lr=1e-3", "run.max_steps=4",
        "run.log_every=1", "run.eval_every=0", "run.save_every=0", "run.save_rollouts_every=0",
        "eval.at_start=false", "eval.num_print=0"])


def test_rlhf_ctrl_c_mid_step_then_resume_continues_the_same_curve(ray_cluster, tmp_path, monkeypatch):
    """The same for RLHF, whose step goes on after the learners' update (weight sync, KL controller)."""
    from rlhf_ray.stages.rlhf import run_rlhf

    data = write_sft_dataset(tmp_path / "data", tasks=("reverse",), n_train=64, n_eval=8, seed=5)
    full = run_rlhf(rlhf_config(data, tmp_path, "full", "never"))

    # Step 2: after the update, before the sync and the KL controller's update.
    # (The RLHF loop starts the policy's and the critic's updates together: it updates through start_train_step.)
    with pytest.raises(KeyboardInterrupt), sigint_after_update(monkeypatch, 2, "start_train_step") as calls:
        run_rlhf(rlhf_config(data, tmp_path, "cut", "never"))
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_00000002"]

    run_rlhf(rlhf_config(data, tmp_path, "cut", "auto"))
    expected = {m["step"]: m for m in read_metrics(full.run_dir) if m["split"] == "train"}
    got = [m for m in read_metrics(tmp_path / "cut") if m["split"] == "train"]
    assert [m["step"] for m in got] == sorted(expected) == [1, 2, 3, 4]
    for m in got:
        for key in ("reward/mean", "kl", "policy/loss", "response_length", "kl_coef"):
            assert math.isclose(m[key], expected[m["step"]][key], rel_tol=1e-5, abs_tol=1e-7), (m["step"], key)
