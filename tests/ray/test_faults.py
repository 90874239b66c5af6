"""Real faults in a running RLHF run: actors killed by their process ids, a reward function that hangs.

A killed generator, reference or reward actor (or a hung one) is replaced and its step retried: the run's
curve equals an uninterrupted run's, step for step, and the metrics say what was restarted. A killed learner
rank stops the run naming the rank and the last checkpoint, and run.resume=auto continues the same curve.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray

from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.synthetic import write_sft_dataset
from rlhf_ray.rewards.drills import drill_file
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.stages.common import read_metrics
from rlhf_ray.stages.recovery import RoleLostError
from rlhf_ray.stages.rlhf import RLHFLoop, run_rlhf
from rlhf_ray.stages.rlhf_roles import Roles

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

COMPARED = ("reward/mean", "kl", "policy/loss", "response_length", "kl_coef")


def config(data: dict[str, Path], out: Path, name: str, *overrides: str) -> RLHFConfig:
    return load_config(RLHFConfig, Path("configs/tiny-cpu/rlhf.yaml"), [
        "policy.path=tiny:tiny", f"data.train={data['train']}", f"data.eval={data['eval']}",
        "eval.num_generate=4", f"run.output_dir={out}", f"run.name={name}", "run.resume=never",
        "reward.functions=[{path: 'rlhf_ray.rewards.drills:hang_then_task_score'}]", "algorithm.advantage=grpo",
        "algorithm.prompts_per_step=4", "generator.samples_per_prompt=2", "generator.max_new_tokens=6",
        "generator.cpu_kv_cache_gib=0.125", "learner.micro_batch_size=4", "learner.lr=1e-3", "run.max_steps=4",
        "run.log_every=1", "run.eval_every=0", "run.save_every=0", "run.save_rollouts_every=0",
        "eval.at_start=false", "eval.num_print=0", *overrides])


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def train_rows(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m["split"] == "train"]


def assert_same_curve(got: list[dict], expected: list[dict]) -> None:
    by_step = {m["step"]: m for m in expected}
    assert [m["step"] for m in got] == sorted(by_step)  # no step lost, none logged twice
    for m in got:
        for key in COMPARED:
            assert math.isclose(m[key], by_step[m["step"]][key], rel_tol=1e-5, abs_tol=1e-7), (m["step"], key)


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("faults")
    data = write_sft_dataset(out / "data", tasks=("reverse",), n_train=64, n_eval=8, seed=5)
    drill_file().unlink(missing_ok=True)
    full = run_rlhf(config(data, out, "full"))
    return {"data": data, "out": out, "full": train_rows(full.run_dir)}


def test_killed_and_hung_scorers_and_generator_are_replaced_with_no_step_lost(runs, monkeypatch):
    """Step 2: the generator is killed while generating; step 3: the reference while scoring; step 4: the
    reward function hangs past reward.timeout_s. Each is replaced in its bundle and the step retried."""
    current, done = {"step": -1}, set()
    experience, generate, score = RLHFLoop._experience, RLHFLoop._generate, Roles.score

    def tracked_experience(self, step):
        current["step"] = step
        if step == 3 and "reward" not in done:
            done.add("reward")
            drill_file().parent.mkdir(parents=True, exist_ok=True)
            drill_file().write_text("1")  # the next reward call hangs
        return experience(self, step)

    def killing_generate(self, step, *args, **kwargs):
        ref = generate(self, step, *args, **kwargs)
        if current["step"] == 1 and "generator" not in done:
            done.add("generator")
            os.kill(self.roles.generators.info[0]["pid"], signal.SIGKILL)  # mid-generation
        return ref

    def killing_score(self, rollouts, n, *args, **kwargs):
        if current["step"] != 2 or "reference" in done:
            return score(self, rollouts, n, *args, **kwargs)
        done.add("reference")
        pid = pid_of(self.reference.actors[0])
        scores = score(self, rollouts, n, *args, **kwargs)
        os.kill(pid, signal.SIGKILL)  # while it computes the step's reference logprobs
        return scores

    monkeypatch.setattr(RLHFLoop, "_experience", tracked_experience)
    monkeypatch.setattr(RLHFLoop, "_generate", killing_generate)
    monkeypatch.setattr(Roles, "score", killing_score)
    try:
        result = run_rlhf(config(runs["data"], runs["out"], "faulty", "reward.timeout_s=8"))
    finally:
        drill_file().unlink(missing_ok=True)
    got = train_rows(result.run_dir)
    assert done == {"generator", "reference", "reward"}
    assert_same_curve(got, runs["full"])
    restarted = {m["step"]: sorted(k for k in m if k.startswith("restarts/") and k not in
                                   ("restarts/total", "restarts/seconds")) for m in got}
    assert restarted == {1: [], 2: ["restarts/generator"], 3: ["restarts/reference"], 4: ["restarts/reward"]}
    assert [m["restarts/total"] for m in got] == [0, 1, 2, 3]
    for m in got[1:]:
        print(f"step {m['step']}: {restarted[m['step']][0]} recovered in {m['restarts/seconds']:.1f} s "
              f"(step time {m['step_time']:.1f} s)")


def test_a_reward_function_that_keeps_hanging_stops_the_run_naming_the_role(runs):
    """With dynamic sampling, whose rounds call the reward themselves (the timeout holds there too)."""
    drill_file().parent.mkdir(parents=True, exist_ok=True)
    drill_file().write_text("5")
    try:
        with pytest.raises(RoleLostError, match=r"step 1: reward 0 failed again \(hung.*run.max_restarts=1"):
            run_rlhf(config(runs["data"], runs["out"], "hangs", "reward.timeout_s=4", "run.max_restarts=1",
                            "run.max_steps=1", "algorithm.dynamic_sampling=true"))
    finally:
        left = drill_file().read_text()
        drill_file().unlink(missing_ok=True)
    assert left == "3"  # two calls hung: the first attempt and the one retry


def test_a_killed_learner_rank_stops_the_run_and_resume_continues_the_curve(runs, monkeypatch):
    original, calls = LearnerGroup.start_train_step, []

    def killing_train_step(self, *args, **kwargs):
        calls.append(1)
        pid = pid_of(self.group.actors[1]) if len(calls) == 3 else None
        refs = original(self, *args, **kwargs)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)  # rank 1, during the update of step 3
        return refs

    overrides = ("run.save_every=2",)
    monkeypatch.setattr(LearnerGroup, "start_train_step", killing_train_step)
    with pytest.raises(RoleLostError, match=r"step 3 \(train\): policy learner rank 1 died.*step_00000002.*"
                                            r"run.resume=auto"):
        run_rlhf(config(runs["data"], runs["out"], "learner-killed", *overrides))
    monkeypatch.setattr(LearnerGroup, "start_train_step", original)
    began = time.perf_counter()
    result = run_rlhf(config(runs["data"], runs["out"], "learner-killed", *overrides, "run.resume=auto"))
    rows = train_rows(result.run_dir)
    assert_same_curve(rows, runs["full"])
    print(f"resumed run: {time.perf_counter() - began:.1f} s for steps 3-4 and the final evaluation "
          f"(steps 3-4 took {sum(m['step_time'] for m in rows[2:]):.1f} s); 1 step redone, none lost")


def test_nan_rewards_skip_the_update_and_too_many_in_a_row_stop_the_run(runs, monkeypatch):
    """Injected NaN rewards: step 2 is skipped and the run goes on (step 3 trains); steps 4 and 5 are too, and
    with run.max_bad_steps=2 the run stops at step 5 naming it. Every checkpoint written is finite."""
    import torch

    from rlhf_ray.stages.guards import BadStepsError

    nans = drill_file("reward_nans")
    experience = RLHFLoop._experience

    def injecting(self, step):
        if step in (1, 3):
            nans.parent.mkdir(parents=True, exist_ok=True)
            nans.write_text("1" if step == 1 else "2")  # the step's reward call (and the next one) return NaN
        return experience(self, step)

    monkeypatch.setattr(RLHFLoop, "_experience", injecting)
    try:
        with pytest.raises(BadStepsError, match=r"2 steps in a row.*run.max_bad_steps=2.*step 5, phase score, "
                                                r"statistic 'nonfinite/rewards'"):
            run_rlhf(config(runs["data"], runs["out"], "nan", "run.max_steps=6", "run.max_bad_steps=2",
                            "run.save_every=1", "run.keep_checkpoints=6",
                            "reward.functions=[{path: 'rlhf_ray.rewards.drills:nan_then_task_score'}]"))
    finally:
        nans.unlink(missing_ok=True)
    run_dir = runs["out"] / "nan"
    rows = {m["step"]: m for m in train_rows(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4]  # step 5 stopped the run before it was logged
    assert [rows[s]["bad_steps/skipped"] for s in (1, 2, 3, 4)] == [0, 1, 0, 1]
    assert [rows[s]["bad_steps/total"] for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
    assert math.isnan(rows[2]["reward/mean"]) and rows[2]["nonfinite/rewards"] == 8
    assert "policy/loss" not in rows[2] and math.isfinite(rows[3]["policy/loss"])  # step 2 never trained
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"step_{s:08d}" for s in (1, 2, 3, 4)]
    for checkpoint in checkpoints:
        states = torch.load(checkpoint / "policy" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
        assert all(torch.isfinite(t).all() for t in states["module"].values()), checkpoint
