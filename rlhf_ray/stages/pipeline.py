"""The whole pipeline: SFT -> reward model -> RLHF (mode rm+rlhf) or SFT -> DPO (mode dpo), ending with a
before/after table (the SFT policy vs the trained one, on the last stage's held-out evaluation) and the run report
(report.html and plots of every stage, `rlhf_ray.report`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from rlhf_ray.config import PipelineConfig
from rlhf_ray.report.build import write_report
from rlhf_ray.stages.common import read_metrics
from rlhf_ray.stages.dpo import run_dpo
from rlhf_ray.stages.rlhf import run_rlhf
from rlhf_ray.stages.rm import run_rm
from rlhf_ray.stages.sft import run_sft
from rlhf_ray.stages.supervised import StageResult

# Per final stage: its label in the table and the held-out metrics it compares (those the run reports).
TABLE_KEYS = {"rlhf": ("RLHF", ("reward", "accuracy", "task_score", "kl", "response_length")),
              "dpo": ("DPO", ("accuracy", "score", "preference_accuracy", "reward_margin", "logp_accuracy"))}


def run_pipeline(cfg: PipelineConfig) -> dict[str, StageResult]:
    results = {"sft": run_sft(cfg.sft)}
    sft_model = str(results["sft"].model_dir)
    if cfg.mode == "dpo":
        results["dpo"] = run_dpo(replace(cfg.dpo, model=replace(cfg.dpo.model, path=sft_model)))
    else:
        _run_rm_rlhf(cfg, sft_model, results)
    table = before_after_table(results)
    tqdm.write(table)
    # Next to the stage dirs: <output_dir>/<their common name prefix>-report/ (see report.build.default_out_dir).
    report = write_report([r.run_dir for r in results.values()], before_after=table)
    tqdm.write(f"[pipeline] report: {report}")
    return results


def _run_rm_rlhf(cfg: PipelineConfig, sft_model: str, results: dict[str, StageResult]) -> None:
    rlhf = cfg.rlhf
    if cfg.rm is not None:
        rm_cfg = replace(cfg.rm, model=replace(cfg.rm.model, path=sft_model)) if cfg.rm_from_sft else cfg.rm
        results["rm"] = run_rm(rm_cfg)
        rlhf = replace(rlhf, reward=replace(rlhf.reward, model=str(results["rm"].model_dir)))
    rlhf = replace(rlhf, policy=replace(rlhf.policy, path=sft_model))
    results["rlhf"] = run_rlhf(rlhf)


def _evals(result: StageResult) -> list[dict[str, Any]]:
    return [m for m in read_metrics(result.run_dir) if m["split"] == "eval"]


def before_after_table(results: dict[str, StageResult]) -> str:
    """Held-out metrics of the SFT policy (the last stage's step-0 evaluation, when eval.at_start) and of the
    final policy, side by side. The greedy answers are to the last stage's held-out prompts (DPO: the feedback's)."""
    stage = "dpo" if "dpo" in results else "rlhf"
    label, candidates = TABLE_KEYS[stage]
    evals = _evals(results[stage])
    before, after = evals[0], evals[-1]
    if before["step"] != 0:  # no step-0 evaluation (eval.at_start=false): nothing to compare with
        before = {}
    keys = [k for k in candidates if k in after]
    lines = ["", "held-out prompts, greedy answers", f"{'metric':20} {'SFT':>10} {label:>10}"]
    lines += [f"{k:20} {before.get(k, float('nan')):10.4f} {after[k]:10.4f}" for k in keys]
    if "rm" in results:
        rm = _evals(results["rm"])[-1]
        if "accuracy" in rm:
            lines.append(f"reward model held-out pairwise accuracy: {rm['accuracy']:.4f}")
    return "\n".join(lines)
