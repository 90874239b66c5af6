"""DAPO's dynamic sampling in the RLHF loop (Yu et al. 2025, sec 3.2): over-sample and keep only the prompt
groups whose scores differ, so that every group of the step carries a gradient.

A step runs rounds: generate `prompts_per_step` prompts' groups, score them with the reward actors alone,
keep the informative groups (`algorithms.dapo.informative_groups`, on the shaped score the advantages will
see); until `prompts_per_step` groups are kept or `dynamic_sampling_max_rounds` rounds have run. Refill
rounds draw prompts not yet used in the step (seeded by step and round, so a resumed run draws the same).
The step then trains on the first `prompts_per_step` kept groups; one that could not fill the batch trains
on what it kept (the experience is padded with empty filler rows that weigh nothing: see
`rollout.experience.pad_experience`), and if no group at all was informative, on the last round as it is
(zero advantages: only the KL and entropy terms act).

The reward tables of the kept rows are handed on to the experience, so the rows are scored once for
training (the reward actors also re-score the joined table with the other scorers; that result is
replaced, see `Roles.score`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from rlhf_ray.algorithms.dapo import informative_groups
from rlhf_ray.rollout.experience import ExperienceParams, sequence_scores


def refill_prompts(num_prompts: int, used: Sequence[int], k: int, seed: Sequence[int]) -> list[int]:
    """Up to `k` prompt rows not in `used`, in a seeded random order (fewer when fewer are left)."""
    taken = set(int(u) for u in used)
    order = np.random.default_rng(list(seed)).permutation(num_prompts).tolist()
    return [r for r in order if r not in taken][:k]


def _sorted_scores(parts: list[pa.Table], num_rows: int) -> pa.Table:
    table = pa.concat_tables(parts).sort_by("row")
    if table.num_rows != num_rows:
        raise ValueError(f"reward scores for {table.num_rows} of {num_rows} rollouts")
    return table


def keep_informative(rollouts: pa.Table, rewards: pa.Table, params: ExperienceParams
                     ) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """(kept rollout rows, their reward rows, counts: groups, kept groups, generated tokens) of one round: the
    groups whose shaped scores (`sequence_scores`) are not all equal, in rollout order. `rewards`: the reward
    actors' (score, score/<part>...) rows aligned with `rollouts`."""
    scores, _ = sequence_scores(rollouts, rewards, params)
    groups = torch.tensor(rollouts.column("group").to_pylist(), dtype=torch.long)
    keep = informative_groups(groups, scores)
    rows = pa.array(torch.nonzero(keep).squeeze(1).tolist(), pa.int64())  # typed: the list may be empty
    # A NaN score makes its group look uninformative (NaN compares false): counted, so that the step is
    # skipped as a bad one (stages.guards) rather than trained on the other groups as if nothing happened.
    counts = {"groups": len(set(groups.tolist())), "kept": len(set(groups[keep].tolist())),
              "tokens": sum(len(r) for r in rollouts.column("response_ids").to_pylist()),
              "nonfinite": int((~torch.isfinite(scores)).sum())}
    return rollouts.take(rows), rewards.take(rows), counts


def join_kept(num_groups: int, samples: int, rollouts: Sequence[pa.Table], rewards: Sequence[pa.Table]
              ) -> tuple[pa.Table, pa.Table]:
    """The first `num_groups` groups (of `samples` rows each, contiguous) of the rounds' kept rows, as one
    rollout table and its reward table with `row` 0..n-1 (as the reward actors make it)."""
    joined = pa.concat_tables(rollouts)[:num_groups * samples]
    scores = pa.concat_tables(rewards)[:num_groups * samples]
    return joined, scores.add_column(0, "row", pa.array(range(scores.num_rows), pa.int64()))


@ray.remote(num_cpus=0, num_returns=3)
def filter_round(rollouts: pa.Table, reward_parts: list, params: ExperienceParams
                 ) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """`keep_informative` next to the data; `reward_parts`: refs to the reward actors' (row, score...) tables."""
    rewards = _sorted_scores(ray.get(reward_parts), rollouts.num_rows).drop_columns(["row"])
    return keep_informative(rollouts, rewards, params)


@ray.remote(num_cpus=0, num_returns=2)
def join_rounds(num_groups: int, samples: int, *tables: pa.Table) -> tuple[pa.Table, pa.Table]:
    """`join_kept` next to the data; `tables`: rollouts then rewards of each round, alternating."""
    return join_kept(num_groups, samples, tables[0::2], tables[1::2])


@dataclass
class Collected:
    """A step's rollouts after dynamic sampling: refs to the tables, how many rows, and the step metrics."""

    rollouts: ray.ObjectRef
    rewards: list[ray.ObjectRef]  # (row, score, score/<part>...) tables of `rollouts`, as the reward actors make
    num_rows: int
    metrics: dict[str, float]


def collect(first_rows: list[int], num_prompts: int, generate: Callable[[list[int], int], ray.ObjectRef],
            score: Callable[[ray.ObjectRef, int], list], params: ExperienceParams, prompts_per_step: int,
            samples: int, max_rounds: int, seed: Sequence[int]) -> Collected:
    """Run rounds until `prompts_per_step` informative groups are kept or `max_rounds` have run.

    `generate(rows, round)` starts generating `rows`' groups (a ref to the rollout table); `score(rollouts, n)`
    starts the reward actors on its n rows (refs to their (row, score...) tables). `seed`: the step's seed
    for the refill prompts."""
    kept: list[ray.ObjectRef] = []
    used, rows = list(first_rows), list(first_rows)
    groups = kept_groups = tokens = rounds = nonfinite = 0
    last: Optional[tuple[ray.ObjectRef, list, int]] = None
    while rows and rounds < max_rounds and kept_groups < prompts_per_step:
        rollouts = generate(rows, rounds)
        parts = score(rollouts, len(rows) * samples)
        kept_rows, kept_rewards, counts_ref = filter_round.remote(rollouts, parts, params)
        counts = ray.get(counts_ref)
        groups, kept_groups, tokens = groups + counts["groups"], kept_groups + counts["kept"], tokens + counts["tokens"]
        nonfinite += counts["nonfinite"]
        kept += [kept_rows, kept_rewards]
        last, rounds = (rollouts, parts, len(rows) * samples), rounds + 1
        rows = refill_prompts(num_prompts, used, prompts_per_step, [*seed, rounds])
        used += rows
    trained = min(kept_groups, prompts_per_step)
    metrics = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/groups_dropped": float(groups - kept_groups),
               "dynamic_sampling/groups_kept": float(kept_groups), "dynamic_sampling/groups_trained": float(trained),
               "dynamic_sampling/shortfall_groups": float(prompts_per_step - trained),
               "dynamic_sampling/generated_tokens": float(tokens), "dynamic_sampling/nonfinite_rewards": float(nonfinite)}
    if trained == 0:  # nothing informative at all: train on the last round as it is (zero advantages)
        assert last is not None
        return Collected(last[0], last[1], last[2], metrics)
    joined, rewards = join_rounds.remote(trained, samples, *kept)
    return Collected(joined, [rewards], trained * samples, metrics)
