"""Instruction tuning (SFT): the driver loop.

Reads as what it does: validate the data, start the learner group, then per step hand the learner group the
training table's ref and each rank's rows, log, evaluate, checkpoint; finally evaluate and save the model.
The driver holds refs and row indices, never tensors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from tqdm.auto import tqdm

from rlhf_ray.config import SFTConfig
from rlhf_ray.data.sft import load_sft_data
from rlhf_ray.data.synthetic import TASKS, score_answer
from rlhf_ray.distributed.runtime import cluster_device, ray_session, worker_env_vars
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.stages.common import (MetricsLogger, RunDir, StepSampler, read_trainer_state, total_steps)


@dataclass(frozen=True)
class StageResult:
    run_dir: Path
    model_dir: Path
    metrics: dict[str, Any]


def run_sft(cfg: SFTConfig) -> StageResult:
    tokenizer = load_tokenizer(cfg.model)
    data = load_sft_data(cfg.data, tokenizer, cfg.run.seed)  # every row validated before Ray starts
    tqdm.write(f"[sft] data: {json.dumps(data.stats)}")
    run_dir = RunDir(cfg.run.output_dir, cfg.run.name)
    resume_from = run_dir.prepare(cfg, cfg.run.resume)
    with ray_session(cfg.run.ray_address, cfg.run.num_cpus):
        device = cluster_device(cfg.learner.device)
        sampler = StepSampler(data.train.num_rows, cfg.learner.global_batch_size, cfg.learner.num_ranks,
                              cfg.run.seed)
        steps = total_steps(cfg.run.max_steps, cfg.run.epochs, sampler.steps_per_epoch)
        train_ref, eval_ref = ray.put(data.train), ray.put(data.eval)
        eval_rows = data.eval.num_rows
        eval_meta = _eval_metadata(data.eval, cfg.eval.num_generate)
        del data
        learners = LearnerGroup(cfg.model, cfg.learner, "sft", steps, cfg.run.seed, device,
                                runtime_env={"env_vars": worker_env_vars(device)})
        logger = MetricsLogger(run_dir.path)
        try:
            start = 0
            if resume_from is not None:
                learners.load_checkpoint(resume_from)
                start = read_trainer_state(resume_from)["step"]
                tqdm.write(f"[sft] resumed from {resume_from} at step {start}")
            elif cfg.eval.at_start and eval_rows:
                _evaluate(cfg, learners, eval_ref, eval_rows, eval_meta, logger, step=0)
            final = _train(cfg, learners, sampler, train_ref, eval_ref, eval_rows, eval_meta, logger, run_dir,
                           start, steps)
            model_dir = Path(learners.save_model(run_dir.model))
            tqdm.write(f"[sft] model saved to {model_dir}")
            return StageResult(run_dir.path, model_dir, final)
        finally:
            logger.close()
            learners.shutdown()


def _train(cfg: SFTConfig, learners: LearnerGroup, sampler: StepSampler, train_ref: ray.ObjectRef,
           eval_ref: ray.ObjectRef, eval_rows: int, eval_meta: list[dict], logger: MetricsLogger,
           run_dir: RunDir, start: int, steps: int) -> dict[str, Any]:
    step = start
    bar = tqdm(total=steps, initial=start, desc="sft", unit="step", dynamic_ncols=True)
    try:
        while step < steps:
            began = time.perf_counter()
            metrics = learners.train_step(train_ref, sampler.shards(step))
            seconds = time.perf_counter() - began
            step += 1
            metrics.update(step_time=seconds, tokens_per_s=metrics["tokens"] / seconds,
                           epoch=step / sampler.steps_per_epoch)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
            if step % cfg.run.log_every == 0 or step == steps:
                logger.log(step, metrics)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < steps and eval_rows:
                _evaluate(cfg, learners, eval_ref, eval_rows, eval_meta, logger, step)
            if cfg.run.save_every and step % cfg.run.save_every == 0 and step < steps:
                _checkpoint(cfg, learners, run_dir, step)
    except KeyboardInterrupt:
        tqdm.write(f"[sft] interrupted: checkpointing step {step} so run.resume=auto continues from it")
        _checkpoint(cfg, learners, run_dir, step)
        raise
    finally:
        bar.close()
    _checkpoint(cfg, learners, run_dir, step)
    return _evaluate(cfg, learners, eval_ref, eval_rows, eval_meta, logger, step) if eval_rows else {}


def _checkpoint(cfg: SFTConfig, learners: LearnerGroup, run_dir: RunDir, step: int) -> None:
    staging = run_dir.staging_path(step)
    learners.save_checkpoint(staging)
    final = run_dir.commit_checkpoint(staging, step, {"step": step, "stage": "sft"}, cfg.run.keep_checkpoints)
    tqdm.write(f"[sft] checkpoint {final}")


def _eval_metadata(table, num_generate: int) -> list[dict]:
    rows = min(num_generate, table.num_rows)
    part = table.slice(0, rows)
    return [{"prompt": p, "reference": r, **json.loads(m)} for p, r, m in
            zip(part.column("prompt_text").to_pylist(), part.column("reference").to_pylist(),
                part.column("metadata").to_pylist())]


def _evaluate(cfg: SFTConfig, learners: LearnerGroup, eval_ref: ray.ObjectRef, eval_rows: int,
              eval_meta: list[dict], logger: MetricsLogger, step: int) -> dict[str, Any]:
    """Held-out loss, then greedy answers scored by the task checker (rows with a known `task`)."""
    metrics: dict[str, Any] = {"loss": learners.evaluate(eval_ref, list(range(eval_rows)))["loss"]}
    if eval_meta:
        answers = learners.generate(eval_ref, list(range(len(eval_meta))), cfg.eval.max_new_tokens)
        metrics.update(_score(eval_meta, answers))
        _print_samples(eval_meta, answers, cfg.eval.num_print, step)
    logger.log(step, metrics, prefix="eval")
    tqdm.write(f"[sft] eval @ step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


def _score(meta: list[dict], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy (and graded score) overall and per synthetic task."""
    by_task: dict[str, list[tuple[float, float]]] = {}
    for row, answer in zip(meta, answers):
        task = row.get("task")
        if task in TASKS and "input" in row:
            graded = score_answer(task, row["input"], answer)
            by_task.setdefault(task, []).append((float(graded == 1.0), graded))
    out: dict[str, float] = {}
    if by_task:
        every = [pair for pairs in by_task.values() for pair in pairs]
        out["accuracy"] = sum(a for a, _ in every) / len(every)
        out["score"] = sum(s for _, s in every) / len(every)
        for task, pairs in sorted(by_task.items()):
            out[f"accuracy/{task}"] = sum(a for a, _ in pairs) / len(pairs)
    return out


def _print_samples(meta: list[dict], answers: list[str], count: int, step: int) -> None:
    for row, answer in list(zip(meta, answers))[:count]:
        verdict = ""
        if row.get("task") in TASKS and "input" in row:
            verdict = "  ✓" if score_answer(row["task"], row["input"], answer) == 1.0 else "  ✗"
        prompt = row["prompt"].replace("\n", "\\n")
        tqdm.write(f"  [step {step}] {prompt!s:40.40} ref={row['reference']!r:14} got={answer!r}{verdict}")
