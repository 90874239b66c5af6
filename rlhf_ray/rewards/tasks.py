"""Reward functions for the synthetic tasks and for rows with a reference answer."""

from __future__ import annotations

from rlhf_ray.data.synthetic import TASKS, score_answer


def task_score(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """The task checker's graded score in [0, 1] (rows whose metadata names a synthetic task and input)."""
    out = []
    for response, meta in zip(responses, metadata):
        if meta.get("task") not in TASKS or not isinstance(meta.get("input"), str):
            raise ValueError(f"task_score needs metadata with a synthetic 'task' and 'input', got {meta!r:.80}")
        out.append(score_answer(meta["task"], meta["input"], response))
    return out


def exact_match(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """1.0 when the response equals the row's `reference` (whitespace-trimmed), else 0.0."""
    out = []
    for response, meta in zip(responses, metadata):
        if not isinstance(meta.get("reference"), str):
            raise ValueError("exact_match needs a 'reference' in each prompt row (an output field)")
        out.append(float(response.strip() == meta["reference"].strip()))
    return out
