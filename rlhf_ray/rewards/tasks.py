"""Reward functions for the synthetic tasks and for rows with a reference answer, and the synthetic tasks'
answer checker (`eval.checker`'s default)."""

from __future__ import annotations

from typing import Optional

from rlhf_ray.data.synthetic import TASKS, score_answer


def check_answer(metadata: dict, response: str) -> Optional[float]:
    """The task checker's graded score in [0, 1] (1.0: exactly right) of a row whose metadata names a synthetic
    task and its input; None for any other row (it cannot be graded)."""
    if metadata.get("task") not in TASKS or not isinstance(metadata.get("input"), str):
        return None
    return score_answer(metadata["task"], metadata["input"], response)


def task_score(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """The task checker's graded score in [0, 1] (rows whose metadata names a synthetic task and input)."""
    out = []
    for response, meta in zip(responses, metadata):
        score = check_answer(meta, response)
        if score is None:
            raise ValueError(f"task_score needs metadata with a synthetic 'task' and 'input', got {meta!r:.80}")
        out.append(score)
    return out


def exact_match(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """1.0 when the response equals the row's `reference` (whitespace-trimmed), else 0.0."""
    out = []
    for response, meta in zip(responses, metadata):
        if not isinstance(meta.get("reference"), str):
            raise ValueError("exact_match needs a 'reference' in each prompt row (an output field)")
        out.append(float(response.strip() == meta["reference"].strip()))
    return out
