"""Rollouts + scorer outputs -> the experience table the learners train on, with the step's statistics.

`build_experience` is plain Python over Arrow tables (tested without Ray); the RLHF driver runs it as a Ray
task so the joined batch is made next to its inputs and goes into the object store once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rlhf_ray.algorithms.advantages import (
    AdvantageInputs,
    estimate_advantages,
    token_rewards,
)
from rlhf_ray.algorithms.dapo import overlong_penalty
from rlhf_ray.algorithms.kl import kl_estimate
from rlhf_ray.algorithms.masked import masked_mean, masked_sum, masked_whiten
from rlhf_ray.rollout.schema import EXPERIENCE_SCHEMA, response_mask, response_tensor


@dataclass(frozen=True)
class ExperienceParams:
    advantage: str
    kl_coef: float
    kl_estimator: str
    kl_in_reward: bool
    gamma: float
    lam: float
    whiten_advantages: bool
    # DAPO's overlong shaping (algorithm.overlong_buffer/penalty; 0: off) against generator.max_new_tokens.
    overlong_buffer: int = 0
    overlong_penalty: float = 0.0
    max_new_tokens: int = 0


def sequence_scores(rollouts: pa.Table, rewards: pa.Table, params: ExperienceParams
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """([B] the score each rollout trains on, [B] its overlong penalty or None when shaping is off): the
    reward actors' summed score plus DAPO's overlong penalty. Dynamic sampling filters on the same scores."""
    scores = torch.tensor(rewards.column("score").to_pylist(), dtype=torch.float32)
    if not (params.overlong_buffer and params.overlong_penalty):
        return scores, None
    lengths = torch.tensor([len(r) for r in rollouts.column("response_ids").to_pylist()])
    penalty = overlong_penalty(lengths, params.max_new_tokens, params.overlong_buffer, params.overlong_penalty)
    return scores + penalty, penalty


def rows_in_order(parts: Sequence[pa.Table], num_rows: int) -> list[list[float]]:
    """Join per-rank (row, values) tables back into rollout row order."""
    out: list[Optional[list[float]]] = [None] * num_rows
    for part in parts:
        for row, values in zip(part.column("row").to_pylist(), part.column("values").to_pylist()):
            out[row] = values
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"no values for rollout rows {missing[:5]} (a shard went missing)")
    return out  # type: ignore[return-value]


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1.0 - var_residual / var_returns) if var_returns > 0 else float("nan")


def build_experience(rollouts: pa.Table, ref_logprobs: Optional[list[list[float]]], rewards: pa.Table,
                     old_logprobs: Optional[list[list[float]]], values: Optional[list[list[float]]],
                     params: ExperienceParams) -> tuple[pa.Table, dict[str, float]]:
    """The experience table (EXPERIENCE_SCHEMA) and the step's statistics (reward, KL, length, gap, ...,
    and `nonfinite/rewards` (rows) and `nonfinite/advantages` (response tokens): counts of NaN or inf values,
    which are kept as they are in the table).

    `old_logprobs` None: the learners did not score pi_old (a batch trained in one optimizer step, whose
    training forward is pi_old): the sampling policy's logprobs stand in for the KL to the reference, and the
    learner reports the vLLM/learner gap from its training forward instead of this table. `ref_logprobs` None:
    no reference role (the KL has no weight): no KL term, no KL statistic, empty ref_logprobs rows."""
    response_ids = rollouts.column("response_ids").to_pylist()
    rollout_column = rollouts.column("rollout_logprobs").to_pylist()
    mask = response_mask(response_ids)
    rollout_lp = response_tensor(rollout_column)
    old = response_tensor(old_logprobs) if old_logprobs is not None else rollout_lp
    ref = response_tensor(ref_logprobs) if ref_logprobs is not None else None
    scores, overlong = sequence_scores(rollouts, rewards, params)
    groups = torch.tensor(rollouts.column("group").to_pylist(), dtype=torch.long)
    kl = kl_estimate(old, ref, params.kl_estimator) * mask if ref is not None else torch.zeros_like(mask)
    rewards_t = token_rewards(scores, kl if params.kl_in_reward else None, params.kl_coef, mask)
    value_t = response_tensor(values) if values is not None else None
    advantages, returns = estimate_advantages(params.advantage, AdvantageInputs(
        token_rewards=rewards_t, mask=mask, group_ids=groups, values=value_t, gamma=params.gamma, lam=params.lam))
    if params.whiten_advantages and params.advantage == "gae":
        advantages = masked_whiten(advantages, mask)
    lengths = mask.sum(-1)
    stats = {
        # Counted before anything could hide them: NaN and inf pass through every estimator (the step is then
        # skipped by the driver's bad-step guard, stages.guards).
        "nonfinite/rewards": float((~torch.isfinite(scores)).sum()),
        "nonfinite/advantages": float((~torch.isfinite(advantages) & (mask > 0)).sum()),
        "reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
        "response_length": float(lengths.mean()),
        "truncated_fraction": sum(r == "length" for r in rollouts.column("finish_reason").to_pylist()) / len(lengths),
        "advantage/mean": float(masked_mean(advantages, mask)),
    }
    if ref is not None:
        stats["kl"] = float(masked_sum(kl, mask, dim=-1).mean())
    if old_logprobs is not None:
        gap = (rollout_lp - old).abs() * mask
        stats["logprob_gap/mean"] = float(masked_mean(gap, mask)) if mask.sum() > 0 else 0.0
        stats["logprob_gap/max"] = float(gap.max())
    for name in rewards.column_names:
        if name.startswith("score/"):
            stats[f"reward/{name[6:]}"] = float(torch.tensor(rewards.column(name).to_pylist()).mean())
    if overlong is not None:  # a component of reward/mean, as the reward functions' are
        stats["reward/overlong"] = float(overlong.mean())
    if value_t is not None and returns is not None:
        stats["explained_variance"] = _explained_variance(value_t, returns, mask)
        stats["value/mean"] = float(masked_mean(value_t, mask))

    def per_row(t: Optional[torch.Tensor]) -> list[list[float]]:
        if t is None:
            return [[] for _ in response_ids]
        return [row[:len(r)] for row, r in zip(t.tolist(), response_ids)]

    table = pa.Table.from_pydict({
        "prompt_ids": rollouts.column("prompt_ids").to_pylist(), "response_ids": response_ids,
        "rollout_logprobs": rollouts.column("rollout_logprobs").to_pylist(),
        "old_logprobs": old_logprobs if old_logprobs is not None else rollout_column,
        "ref_logprobs": ref_logprobs if ref_logprobs is not None else [[] for _ in response_ids], "values": per_row(value_t),
        "advantages": per_row(advantages), "returns": per_row(returns),
        "score": scores.tolist(), "group": groups.tolist(), "kl_coef": [float(params.kl_coef)] * len(response_ids),
    }, schema=EXPERIENCE_SCHEMA)
    return table, stats


def pad_experience(experience: pa.Table, num_rows: int) -> pa.Table:
    """`experience` with filler rows appended up to `num_rows`: the first row's prompt with an empty response.
    An empty response has no real token, so a filler row adds nothing to any loss and is not counted in any
    normaliser (token, sequence or constant aggregation; the value loss): the learners, whose step shape is
    fixed by the config, train on exactly the real rows. Dynamic sampling uses it for a step it could not
    fill."""
    missing = num_rows - experience.num_rows
    if missing < 0 or experience.num_rows == 0:
        raise ValueError(f"cannot pad {experience.num_rows} experience rows to {num_rows}")
    if missing == 0:
        return experience
    empty: dict = {name: [[]] * missing for name in ("response_ids", "rollout_logprobs", "old_logprobs",
                                                     "ref_logprobs", "values", "advantages", "returns")}
    filler = pa.Table.from_pydict({
        **empty, "prompt_ids": [experience.column("prompt_ids")[0].as_py()] * missing, "score": [0.0] * missing,
        "group": [-1] * missing, "kl_coef": [experience.column("kl_coef")[0].as_py()] * missing,
    }, schema=EXPERIENCE_SCHEMA)
    return pa.concat_tables([experience, filler])


def write_rollouts(path: Path, rollouts: pa.Table, experience: pa.Table,
                   kl_per_token: Sequence[Sequence[float]]) -> None:
    """One step's samples as Parquet (decoded text, score, KL, length) for inspection."""
    table = pa.table({
        "prompt": rollouts.column("prompt_text"), "response": rollouts.column("response_text"),
        "score": experience.column("score"),
        "kl": pa.array([float(sum(k)) for k in kl_per_token], pa.float32()),
        "length": pa.array([len(r) for r in experience.column("response_ids").to_pylist()], pa.int32()),
        "finish_reason": rollouts.column("finish_reason"), "metadata": rollouts.column("metadata"),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def kl_rows(experience: pa.Table, estimator: str) -> list[list[float]]:
    """Per-token KL of each row (for the Parquet dump)."""
    old = experience.column("old_logprobs").to_pylist()
    ref = experience.column("ref_logprobs").to_pylist()
    return [kl_estimate(torch.tensor(o), torch.tensor(r), estimator).tolist() if o and r else [] for o, r in zip(old, ref)]


