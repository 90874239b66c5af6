"""Instruction tuning (SFT): next-token loss on the response tokens, evaluated by held-out loss and by
`eval.checker` on greedy answers to held-out prompts."""

from __future__ import annotations

import json
from typing import Any, Optional

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from rlhf_ray.config import EvalConfig, SFTConfig
from rlhf_ray.config_loader import ConfigError
from rlhf_ray.data.sft import load_sft_data
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.rewards.checker import grade_answers, grade_summary, load_checker
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.roles.objectives import SFTObjective
from rlhf_ray.stages.supervised import StagePlan, StageResult, run_supervised


def run_sft(cfg: SFTConfig) -> StageResult:
    tokenizer = load_tokenizer(cfg.model)
    data = load_sft_data(cfg.data, tokenizer, cfg.run.seed)  # every row validated before Ray starts
    plan = StagePlan("sft", SFTObjective(), data.train, data.eval, data.stats, SFTEvaluator(cfg.eval, data.eval))
    return run_supervised(plan, cfg)


class SFTEvaluator:
    """Held-out loss, then greedy answers graded by `eval.checker` (rows it can grade)."""

    def __init__(self, cfg: EvalConfig, table: pa.Table):
        if cfg.max_new_tokens is None:
            raise ConfigError("eval.max_new_tokens: SFT needs a number (null means generator.max_new_tokens, "
                              "which only RLHF has)")
        load_checker(cfg.checker)  # fail on a bad import path before Ray starts
        self.cfg = cfg
        self.num_rows = table.num_rows
        part = table.slice(0, min(cfg.num_generate, table.num_rows))
        self.prompts = part.column("prompt_text").to_pylist()
        self.references = part.column("reference").to_pylist()
        # What the checker sees: the row's extra fields, plus the reference answer (as RLHF prompt rows have it).
        self.metadata = [{"reference": r, **json.loads(m)}
                         for r, m in zip(self.references, part.column("metadata").to_pylist())]

    def __call__(self, learners: LearnerGroup, eval_ref: ray.ObjectRef, step: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {"loss": learners.evaluate(eval_ref, list(range(self.num_rows)))["loss"]}
        if self.prompts:
            answers = learners.generate(eval_ref, list(range(len(self.prompts))), self.cfg.max_new_tokens)
            grades = grade_answers(self.cfg.checker, self.metadata, answers)
            metrics.update(score_answers(self.metadata, grades))
            print_samples(self.prompts, self.references, answers, grades, self.cfg.num_print, step)
        return metrics


def score_answers(metadata: list[dict], grades: list[Optional[float]]) -> dict[str, float]:
    """Exact-match accuracy (grade 1.0) and mean grade over the graded rows, and accuracy per metadata `task`."""
    by_task: dict[Optional[str], list[float]] = {}
    for meta, grade in zip(metadata, grades):
        if grade is not None:
            task = meta.get("task")
            by_task.setdefault(task if isinstance(task, str) else None, []).append(grade)
    # Grouped by task, in order of first appearance: the order the overall mean has always been summed in.
    summary = grade_summary([g for scores in by_task.values() for g in scores])
    if summary is None:
        return {}
    out = {"accuracy": summary[0], "score": summary[1]}
    for task, scores in sorted((t, s) for t, s in by_task.items() if t is not None):
        out[f"accuracy/{task}"] = sum(s == 1.0 for s in scores) / len(scores)
    return out


def print_samples(prompts: list[str], references: list[str], answers: list[str], grades: list[Optional[float]],
                  count: int, step: int) -> None:
    for prompt, reference, answer, grade in list(zip(prompts, references, answers, grades))[:count]:
        verdict = "" if grade is None else "  ✓" if grade == 1.0 else "  ✗"
        prompt = prompt.replace("\n", "\\n")
        tqdm.write(f"  [step {step}] {prompt!s:44.44} ref={reference!r:12} got={answer!r}{verdict}")
