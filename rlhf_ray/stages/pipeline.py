"""The whole pipeline: SFT -> reward model -> RLHF, ending with a before/after table (SFT vs RLHF policy)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from rlhf_ray.config import PipelineConfig
from rlhf_ray.stages.common import read_metrics
from rlhf_ray.stages.rlhf import run_rlhf
from rlhf_ray.stages.rm import run_rm
from rlhf_ray.stages.sft import run_sft
from rlhf_ray.stages.supervised import StageResult


def run_pipeline(cfg: PipelineConfig) -> dict[str, StageResult]:
    results = {"sft": run_sft(cfg.sft)}
    sft_model = str(results["sft"].model_dir)
    rlhf = cfg.rlhf
    if cfg.rm is not None:
        rm_cfg = replace(cfg.rm, model=replace(cfg.rm.model, path=sft_model)) if cfg.rm_from_sft else cfg.rm
        results["rm"] = run_rm(rm_cfg)
        rlhf = replace(rlhf, reward=replace(rlhf.reward, model=str(results["rm"].model_dir)))
    rlhf = replace(rlhf, policy=replace(rlhf.policy, path=sft_model))
    results["rlhf"] = run_rlhf(rlhf)
    tqdm.write(before_after_table(results))
    return results


def _evals(result: StageResult) -> list[dict[str, Any]]:
    return [m for m in read_metrics(result.run_dir) if m["split"] == "eval"]


def before_after_table(results: dict[str, StageResult]) -> str:
    """Held-out metrics of the SFT policy (RLHF step 0) and of the final RLHF policy, side by side."""
    evals = _evals(results["rlhf"])
    before, after = evals[0], evals[-1]
    keys = [k for k in ("reward", "accuracy", "task_score", "kl", "response_length") if k in after]
    lines = ["", "held-out prompts, greedy answers", f"{'metric':18} {'SFT':>10} {'RLHF':>10}"]
    lines += [f"{k:18} {before.get(k, float('nan')):10.4f} {after[k]:10.4f}" for k in keys]
    if "rm" in results:
        rm = _evals(results["rm"])[-1]
        if "accuracy" in rm:
            lines.append(f"reward model held-out pairwise accuracy: {rm['accuracy']:.4f}")
    return "\n".join(lines)
