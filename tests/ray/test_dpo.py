"""The DPO stage on a real learner group and reference actor: from a partly trained tiny SFT model, DPO on the
synthetic `sort` preferences (right answer chosen, a corruption rejected) must raise both the held-out
implicit-reward preference accuracy and the task checker's accuracy on greedy answers to held-out prompts; and a
resumed run continues the same curve.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhf_ray.config import DPOConfig, SFTConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.synthetic import write_feedback_datasets, write_sft_dataset
from rlhf_ray.stages.common import read_metrics
from rlhf_ray.stages.dpo import run_dpo
from rlhf_ray.stages.sft import run_sft

SFT_STEPS = 120
DPO_STEPS = 100


@pytest.fixture(scope="module")
def sft_policy(ray_cluster, tmp_path_factory) -> dict[str, Path]:
    """A tiny model that has partly learned `sort` (greedy accuracy well under 1), and sort feedback."""
    out = tmp_path_factory.mktemp("dpo")
    files = write_sft_dataset(out / "data", tasks=("sort",), n_train=3000, n_eval=64, seed=11)
    feedback = write_feedback_datasets(out / "data", tasks=("sort",), n_train=2000, n_eval=150, seed=11)
    cfg = load_config(SFTConfig, None, [
        f"data.train={files['train']}", f"data.eval={files['eval']}", "data.max_length=40",
        f"run.output_dir={out}", "run.name=sft", "learner.num_ranks=2", "learner.micro_batch_size=32",
        "learner.lr=2e-3", "learner.warmup_steps=20", "learner.lr_schedule=constant", f"run.max_steps={SFT_STEPS}",
        "eval.num_generate=0", "eval.at_start=false", "eval.num_print=0"])
    return {"model": run_sft(cfg).model_dir, "out": out, **feedback}


def dpo_config(policy: dict[str, Path], name: str, *overrides: str) -> DPOConfig:
    return load_config(DPOConfig, Path("configs/tiny-cpu/dpo.yaml"), [
        f"model.path={policy['model']}", f"data.train={policy['pairwise_train']}",
        f"data.eval={policy['pairwise_eval']}", "data.max_length=40", f"run.output_dir={policy['out']}",
        f"run.name={name}", "run.resume=never", "run.log_every=1", "run.eval_every=0", "run.save_every=0",
        "eval.num_print=0", "eval.num_generate=150", "eval.max_new_tokens=10",
        "reference.placement.cpus=2", *overrides])  # the reference runs alone, before the learners start


def split(run_dir: Path, name: str) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m["split"] == name]


def test_dpo_raises_preference_and_checker_accuracy(sft_policy):
    result = run_dpo(dpo_config(sft_policy, "sigmoid", f"run.max_steps={DPO_STEPS}"))
    before, after = split(result.run_dir, "eval")
    print(f"\nDPO held-out: before {before}\nafter {after}")
    # Before training the policy is the reference: every implicit reward is ~0, accuracy ~chance.
    assert abs(before["reward_margin"]) < 1e-3 and 0.3 < before["preference_accuracy"] < 0.7
    assert after["preference_accuracy"] >= 0.9, after
    assert after["reward_margin"] > 0.5
    assert after["loss"] < before["loss"] - 0.2
    # The greedy answers to held-out prompts get better, not only the likelihood ranking.
    assert after["accuracy"] >= before["accuracy"] + 0.1, (before, after)
    train = split(result.run_dir, "train")
    assert all(math.isfinite(m["loss"]) for m in train)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_continues_the_same_curve(sft_policy, lora):
    """Also with LoRA adapters (`learner.lora`): only they train, the saved policy is merged, the adapter saved."""
    common = ["run.max_steps=6", "run.save_every=3", "learner.micro_batch_size=8", "eval.num_generate=0",
              "eval.at_start=false", f"data.train={sft_policy['ranking_eval']}", "data.eval=null",
              "data.eval_fraction=0.1"]  # a small ranking file: rows of 4 candidates, held-out prompts split off
    if lora:
        common += ["learner.lora.rank=8", "learner.lr=2e-3"]
    full = run_dpo(dpo_config(sft_policy, f"full-lora{lora}", *common))
    assert (full.model_dir / "adapter" / "adapter_config.json").is_file() == lora
    checkpoint = full.run_dir / "checkpoints" / "step_00000003"
    resumed = run_dpo(dpo_config(sft_policy, f"resumed-lora{lora}", *common, f"run.resume={checkpoint}"))
    a = {m["step"]: m["loss"] for m in split(full.run_dir, "train")}
    b = {m["step"]: m["loss"] for m in split(resumed.run_dir, "train")}
    assert sorted(b) == [4, 5, 6] and a[6] != a[1]
    for step in (4, 5, 6):
        assert math.isclose(a[step], b[step], rel_tol=1e-6, abs_tol=1e-7), (step, a, b)
