"""Ray tasks of the RLHF loop: they run next to the data, so the driver only passes refs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import ray

from rlhf_ray.algorithms.kl import kl_estimate
from rlhf_ray.data.synthetic import TASKS, score_answer
from rlhf_ray.rollout.experience import (
    ExperienceParams,
    build_experience,
    kl_rows,
    rows_in_order,
    write_rollouts,
)
from rlhf_ray.rollout.schema import response_mask, response_tensor


@ray.remote(num_cpus=0)
def concat_tables(*tables: pa.Table) -> pa.Table:
    """The generators' shards as one rollout table (prompt order kept)."""
    return pa.concat_tables(tables)


def _scores_in_order(parts: list[pa.Table], num_rows: int) -> pa.Table:
    table = pa.concat_tables(parts).sort_by("row")
    if table.num_rows != num_rows:
        raise ValueError(f"reward scores for {table.num_rows} of {num_rows} rollouts")
    return table.drop_columns(["row"])


@ray.remote(num_cpus=0, num_returns=2)
def make_experience(rollouts: pa.Table, ref_parts: list, reward_parts: list, old_parts: list,
                    value_parts: Optional[list], params: ExperienceParams,
                    rollout_path: Optional[str]) -> tuple[pa.Table, dict[str, float]]:
    """Join the scorers' outputs (refs resolved here, not in the driver) and compute advantages."""
    n = rollouts.num_rows
    ref = rows_in_order(ray.get(ref_parts), n)
    rewards = _scores_in_order(ray.get(reward_parts), n)
    old = rows_in_order(ray.get(old_parts), n)
    values = rows_in_order(ray.get(value_parts), n) if value_parts else None
    experience, stats = build_experience(rollouts, ref, rewards, old, values, params)
    if rollout_path:
        write_rollouts(Path(rollout_path), rollouts, experience, kl_rows(experience, params.kl_estimator))
    return experience, stats


@ray.remote(num_cpus=0)
def summarize_eval(rollouts: pa.Table, ref_parts: list, reward_parts: list, kl_estimator: str,
                   num_samples: int) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Held-out metrics of greedy answers: reward, task accuracy (rows naming a synthetic task), KL, length."""
    n = rollouts.num_rows
    ref = response_tensor(rows_in_order(ray.get(ref_parts), n))
    rewards = _scores_in_order(ray.get(reward_parts), n)
    response_ids = rollouts.column("response_ids").to_pylist()
    mask = response_mask(response_ids)
    policy = response_tensor(rollouts.column("rollout_logprobs").to_pylist())
    kl = (kl_estimate(policy, ref, kl_estimator) * mask).sum(-1)
    scores = rewards.column("score").to_pylist()
    metrics: dict[str, Any] = {"reward": sum(scores) / n, "kl": float(kl.mean()),
                               "response_length": float(mask.sum(-1).mean())}
    responses = rollouts.column("response_text").to_pylist()
    metas = [json.loads(m) for m in rollouts.column("metadata").to_pylist()]
    graded = [score_answer(m["task"], m["input"], r) for m, r in zip(metas, responses)
              if m.get("task") in TASKS and isinstance(m.get("input"), str)]
    if graded:
        metrics["accuracy"] = sum(g == 1.0 for g in graded) / len(graded)
        metrics["task_score"] = sum(graded) / len(graded)
    samples = list(zip(rollouts.column("prompt_text").to_pylist(), responses, scores))[:num_samples]
    return metrics, samples


