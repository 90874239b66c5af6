"""Instruction tuning (SFT): next-token loss on the response tokens, evaluated by held-out loss and by the
task checker on greedy answers to held-out prompts."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from rlhf_ray.config import EvalConfig, SFTConfig
from rlhf_ray.data.sft import load_sft_data
from rlhf_ray.data.synthetic import TASKS, score_answer
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.stages.supervised import StagePlan, StageResult, run_supervised


def run_sft(cfg: SFTConfig) -> StageResult:
    tokenizer = load_tokenizer(cfg.model)
    data = load_sft_data(cfg.data, tokenizer, cfg.run.seed)  # every row validated before Ray starts
    plan = StagePlan("sft", "sft", data.train, data.eval, data.stats, SFTEvaluator(cfg.eval, data.eval))
    return run_supervised(plan, cfg)


class SFTEvaluator:
    """Held-out loss, then greedy answers scored by the task checker (rows whose metadata names a task)."""

    def __init__(self, cfg: EvalConfig, table: pa.Table):
        self.cfg = cfg
        self.num_rows = table.num_rows
        part = table.slice(0, min(cfg.num_generate, table.num_rows))
        self.rows = [{"prompt": p, "reference": r, **json.loads(m)} for p, r, m in
                     zip(part.column("prompt_text").to_pylist(), part.column("reference").to_pylist(),
                         part.column("metadata").to_pylist())]

    def __call__(self, learners: LearnerGroup, eval_ref: ray.ObjectRef, step: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"loss": learners.evaluate(eval_ref, list(range(self.num_rows)))["loss"]}
        if self.rows:
            answers = learners.generate(eval_ref, list(range(len(self.rows))), self.cfg.max_new_tokens)
            metrics.update(score_answers(self.rows, answers))
            print_samples(self.rows, answers, self.cfg.num_print, step)
        return metrics


def _checkable(row: dict) -> bool:
    return row.get("task") in TASKS and isinstance(row.get("input"), str)


def score_answers(rows: list[dict], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy (and graded score) overall and per synthetic task."""
    by_task: dict[str, list[float]] = {}
    for row, answer in zip(rows, answers):
        if _checkable(row):
            by_task.setdefault(row["task"], []).append(score_answer(row["task"], row["input"], answer))
    if not by_task:
        return {}
    every = [s for scores in by_task.values() for s in scores]
    out = {"accuracy": sum(s == 1.0 for s in every) / len(every), "score": sum(every) / len(every)}
    for task, scores in sorted(by_task.items()):
        out[f"accuracy/{task}"] = sum(s == 1.0 for s in scores) / len(scores)
    return out


def print_samples(rows: list[dict], answers: list[str], count: int, step: int) -> None:
    for row, answer in list(zip(rows, answers))[:count]:
        verdict = ""
        if _checkable(row):
            verdict = "  ✓" if score_answer(row["task"], row["input"], answer) == 1.0 else "  ✗"
        prompt = row["prompt"].replace("\n", "\\n")
        tqdm.write(f"  [step {step}] {prompt!s:44.44} ref={row['reference']!r:12} got={answer!r}{verdict}")
