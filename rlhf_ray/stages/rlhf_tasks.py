"""Ray tasks of the RLHF loop: they run next to the data, so the driver only passes refs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import ray

from rlhf_ray.algorithms.kl import kl_estimate
from rlhf_ray.rewards.checker import grade_answers, grade_summary
from rlhf_ray.rollout.experience import (
    ExperienceParams,
    build_experience,
    kl_rows,
    pad_experience,
    rows_in_order,
    write_rollouts,
)
from rlhf_ray.rollout.schema import response_mask, response_tensor


@dataclass(frozen=True)
class Scores:
    """What the scorers make of one rollout table: per role, refs to the workers' tables (rows of the rollout
    table with their values), in the object store until a task resolves them."""

    reference: list[ray.ObjectRef]                        # (row, values): reference logprobs
    reward: list[ray.ObjectRef]                           # (row, score, score/<part>...)
    old_logprobs: list[ray.ObjectRef] = field(default_factory=list)  # (row, values): the policy's own (pi_old)
    values: Optional[list[ray.ObjectRef]] = None          # (row, values): the critic's; None without a critic

    def refs(self) -> list[ray.ObjectRef]:
        """Every ref, to wait on."""
        return [*self.reference, *self.reward, *self.old_logprobs, *(self.values or [])]


@ray.remote(num_cpus=0)
def write_table(table: pa.Table, path: str) -> None:
    """Write a table (e.g. an off-policy batch in flight at a checkpoint) to Parquet, next to the data."""
    import pyarrow.parquet as pq

    pq.write_table(table, path)


@ray.remote(num_cpus=0)
def read_table(path: str) -> pa.Table:
    """A Parquet table, read into the object store by a task (the driver holds only the ref)."""
    import pyarrow.parquet as pq

    return pq.read_table(path)


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
def make_experience(rollouts: pa.Table, scores: Scores, params: ExperienceParams,
                    rollout_path: Optional[str], pad_to: Optional[int] = None) -> tuple[pa.Table, dict[str, float]]:
    """Join the scorers' outputs (refs resolved here, not in the driver) and compute advantages. `pad_to`: append
    empty filler rows up to this many (a dynamic-sampling step short of groups; they weigh nothing)."""
    n = rollouts.num_rows
    ref = rows_in_order(ray.get(scores.reference), n) if scores.reference else None
    rewards = _scores_in_order(ray.get(scores.reward), n)
    old = rows_in_order(ray.get(scores.old_logprobs), n) if scores.old_logprobs else None
    values = rows_in_order(ray.get(scores.values), n) if scores.values else None
    experience, stats = build_experience(rollouts, ref, rewards, old, values, params)
    if rollout_path:
        write_rollouts(Path(rollout_path), rollouts, experience, kl_rows(experience, params.kl_estimator))
    if pad_to is not None:
        experience = pad_experience(experience, pad_to)
    return experience, stats


@ray.remote(num_cpus=0)
def summarize_eval(rollouts: pa.Table, ref_parts: list, reward_parts: list, kl_estimator: str, num_samples: int,
                   checker: Optional[str]) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
    """Held-out metrics of greedy answers: reward, KL, length, and accuracy and mean grade by the answer checker
    at import path `checker` (over the rows it can grade; none when null)."""
    n = rollouts.num_rows
    rewards = _scores_in_order(ray.get(reward_parts), n)
    response_ids = rollouts.column("response_ids").to_pylist()
    mask = response_mask(response_ids)
    scores = rewards.column("score").to_pylist()
    metrics: dict[str, Any] = {"reward": sum(scores) / n, "response_length": float(mask.sum(-1).mean())}
    if ref_parts:  # no reference role when the KL has no weight (see RLHFConfig.needs_reference)
        ref = response_tensor(rows_in_order(ray.get(ref_parts), n))
        policy = response_tensor(rollouts.column("rollout_logprobs").to_pylist())
        metrics["kl"] = float((kl_estimate(policy, ref, kl_estimator) * mask).sum(-1).mean())
    responses = rollouts.column("response_text").to_pylist()
    metas = [json.loads(m) for m in rollouts.column("metadata").to_pylist()]
    summary = grade_summary(grade_answers(checker, metas, responses))
    if summary is not None:
        metrics["accuracy"], metrics["task_score"] = summary
    samples = list(zip(rollouts.column("prompt_text").to_pylist(), responses, scores))[:num_samples]
    return metrics, samples


