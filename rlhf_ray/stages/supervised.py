"""The driver loop shared by the supervised stages (SFT, reward model): one learner group, one dataset.

Per step the driver hands the learner group the training table's ref and each rank's row indices; it logs,
evaluates and checkpoints on schedule, and at the end evaluates and saves the model. The stage supplies the
data, the learner objective and how to evaluate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from rlhf_ray.distributed.runtime import cluster_device, ray_session, worker_env_vars
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.roles.objectives import Objective
from rlhf_ray.stages.common import (
    MetricsLogger,
    RunDir,
    StepSampler,
    read_trainer_state,
    run_steps,
    total_steps,
)

# (learner group, eval table ref, step) -> metrics
Evaluator = Callable[[LearnerGroup, ray.ObjectRef, int], dict[str, Any]]


@dataclass(frozen=True)
class StagePlan:
    name: str                 # "sft", "rm": log prefix and checkpoint tag
    objective: Objective      # what the learner optimises, built from the stage's config
    train: pa.Table
    eval: pa.Table
    data_stats: dict[str, Any]
    evaluate: Evaluator
    # Called after the model is saved, with the learner group and the model directory (e.g. reward stats).
    finalize: Optional[Callable[[LearnerGroup, Path], None]] = None


@dataclass(frozen=True)
class StageResult:
    run_dir: Path
    model_dir: Path
    metrics: dict[str, Any]


def run_supervised(plan: StagePlan, cfg: Any) -> StageResult:
    """Train `plan` with `cfg` (a stage config with model, learner, run and eval parts)."""
    tqdm.write(f"[{plan.name}] data: {json.dumps(plan.data_stats)}")
    run_dir = RunDir(cfg.run.output_dir, cfg.run.name)
    resume_from = run_dir.prepare(cfg, cfg.run.resume)
    with ray_session(cfg.run.ray_address, cfg.run.num_cpus, log_level=cfg.run.log_level):
        device = cluster_device(cfg.learner.device)
        sampler = StepSampler(plan.train.num_rows, cfg.learner.global_batch_size, cfg.learner.num_ranks,
                              cfg.run.seed)
        steps = total_steps(cfg.run.max_steps, cfg.run.epochs, sampler.steps_per_epoch)
        train_ref, eval_ref = ray.put(plan.train), ray.put(plan.eval)
        has_eval = plan.eval.num_rows > 0
        learners = LearnerGroup(cfg.model, cfg.learner, plan.objective, steps, cfg.run.seed, device,
                                runtime_env={"env_vars": worker_env_vars(device)}, name=f"{plan.name}-learner")
        logger = MetricsLogger(run_dir.path)
        loop = _Loop(plan, cfg, learners, sampler, steps, train_ref, eval_ref if has_eval else None, logger,
                     run_dir)
        try:
            start = 0
            if resume_from is not None:
                learners.load_checkpoint(resume_from)
                start = read_trainer_state(resume_from)["step"]
                tqdm.write(f"[{plan.name}] resumed from {resume_from} at step {start}")
            elif cfg.eval.at_start:
                loop.evaluate(0)
            final = run_steps(loop, cfg.run, start)
            model_dir = Path(learners.save_model(run_dir.model))
            if plan.finalize is not None:
                plan.finalize(learners, model_dir)
            tqdm.write(f"[{plan.name}] model saved to {model_dir}")
            return StageResult(run_dir.path, model_dir, final)
        finally:
            logger.close()
            learners.shutdown()


@dataclass
class _Loop:
    """The supervised stage as a `StageLoop` for `run_steps`."""

    plan: StagePlan
    cfg: Any
    learners: LearnerGroup
    sampler: StepSampler
    total_steps: int
    train_ref: ray.ObjectRef
    eval_ref: Optional[ray.ObjectRef]
    logger: MetricsLogger
    run_dir: RunDir

    @property
    def name(self) -> str:
        return self.plan.name

    def step(self, step: int) -> dict[str, Any]:
        began = time.perf_counter()
        metrics = self.learners.train_step(self.train_ref, self.sampler.shards(step))
        seconds = time.perf_counter() - began
        metrics.update(step_time=seconds, tokens_per_s=metrics["tokens"] / seconds,
                       epoch=(step + 1) / self.sampler.steps_per_epoch)
        return metrics

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
                "tok_s": f"{metrics['tokens_per_s']:.0f}"}

    def evaluate(self, step: int) -> dict[str, Any]:
        if self.eval_ref is None:
            return {}
        metrics = self.plan.evaluate(self.learners, self.eval_ref, step)
        self.logger.log(step, metrics, prefix="eval")
        tqdm.write(f"[{self.plan.name}] eval @ step {step}: " +
                   ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def checkpoint(self, step: int) -> None:
        staging = self.run_dir.staging_path(step)
        self.learners.save_checkpoint(staging)
        final = self.run_dir.commit_checkpoint(staging, step, {"step": step, "stage": self.plan.name},
                                               self.cfg.run.keep_checkpoints)
        tqdm.write(f"[{self.plan.name}] checkpoint {final}")
