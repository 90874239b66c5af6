"""DPO (and IPO, SimPO): the policy trained directly on preferences, ratings or rankings.

    feedback ──► DPO table (one row per judged prompt: candidates + pairs)      data.dpo
             ──► ReferenceActor × R: summed response logprobs, once, as a column  (not for SimPO)
             ──► LearnerGroup (DeepSpeed) steps on the policy's logprobs only      roles.dpo_objective
             ──► eval: held-out loss, implicit-reward accuracy and margin, greedy answers graded by eval.checker

The driver loop, checkpoints, exact resume and metrics are the supervised stages' (`stages.supervised`). The
reference logprobs are recomputed on resume: the reference is frozen and the forward deterministic, so the
resumed run sees the same column.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import pyarrow as pa
import ray
import torch
from tqdm.auto import tqdm

from rlhf_ray.algorithms.dpo import candidate_scores, preference_accuracy
from rlhf_ray.config import DPOConfig
from rlhf_ray.data.dpo import REF_COLUMN, candidate_table, load_dpo_data, with_reference
from rlhf_ray.distributed.runtime import cluster_device, ray_session, worker_env_vars
from rlhf_ray.distributed.worker_group import WorkerGroup, group_spec
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.rewards.checker import grade_answers, load_checker
from rlhf_ray.roles.dpo_objective import DPOObjective
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.roles.scorers import ReferenceActor
from rlhf_ray.stages.common import RunDir
from rlhf_ray.stages.resume_check import check_resume_config
from rlhf_ray.stages.sft import print_samples, score_answers
from rlhf_ray.stages.supervised import StagePlan, StageResult, run_supervised


def run_dpo(cfg: DPOConfig) -> StageResult:
    tokenizer = load_tokenizer(cfg.model)
    data = load_dpo_data(cfg.data, tokenizer, cfg.run.seed)  # validated before Ray starts
    load_checker(cfg.eval.checker)  # so is the checker's import path
    checkpoint = RunDir(cfg.run.output_dir, cfg.run.name).find_resume_checkpoint(cfg.run.resume)  # run.resume
    if checkpoint is not None:  # and what it resumes, before the reference logprobs are spent on it
        check_resume_config(cfg, checkpoint, cfg.run.resume_override, quiet=True)
    objective = DPOObjective.of(cfg.loss)
    with ray_session(cfg.run.ray_address, cfg.run.num_cpus, log_level=cfg.run.log_level):
        train, held = data.train, data.eval
        if objective.needs_reference:
            train, held = add_reference_logprobs(cfg, [train, held])
        plan = StagePlan("dpo", objective, train, held, data.stats, DPOEvaluator(cfg, held))
        return run_supervised(plan, cfg)


def add_reference_logprobs(cfg: DPOConfig, tables: Sequence[pa.Table]) -> list[pa.Table]:
    """Each table with `ref_logps`: the reference policy's summed response logprobs of every candidate, from
    `reference.num_actors` reference actors (the RLHF stage's `ReferenceActor`), which stop afterwards."""
    device = cluster_device(cfg.learner.device)
    ref = cfg.reference
    spec = group_spec("dpo-reference", ref.num_actors, ref.placement, ref.gpus_per_actor, device)
    group = WorkerGroup(ReferenceActor, spec, cfg.reference_model, ref.micro_batch_size, device, 1.0,
                        runtime_env={"env_vars": worker_env_vars(device)})
    try:
        out = [with_reference(table, _reference_sums(group, candidate_table(table))) for table in tables]
        rows = sum(t.num_rows for t in tables)
        tqdm.write(f"[dpo] reference logprobs of {rows} rows from {cfg.reference_model.path}")
        return out
    finally:
        group.shutdown()


def _reference_sums(group: WorkerGroup, candidates: pa.Table) -> list[float]:
    """Summed reference logprob of each row of a `candidate_table`, the rows sharded over the actors."""
    if not candidates.num_rows:
        return []
    ref = ray.put(candidates)
    parts = ray.get(group.map_shards(list(range(candidates.num_rows)), lambda a, shard: a.logprobs.remote(ref, shard)))
    # Summed in float32 as the learner sums its own logprobs; the shards are contiguous, so in row order.
    return [float(torch.tensor(values, dtype=torch.float32).sum())
            for part in parts for values in part.column("values").to_pylist()]


def implicit_reward_metrics(logps: Sequence[Sequence[float]], ref_logps: Optional[Sequence[Sequence[float]]],
                            lengths: Sequence[Sequence[int]], pairs: Sequence[Sequence[Sequence[int]]], beta: float,
                            length_normalised: bool) -> dict[str, float]:
    """Held-out statistics over every (better, worse) pair of every row: `preference_accuracy` (share with the
    higher implicit reward β s on the better answer, ties one half), `reward_margin` (mean β (s_better -
    s_worse)), `logp_accuracy` (share whose better answer the policy itself finds more likely)."""
    right = gap = likely = 0.0
    total = 0
    for i, row_pairs in enumerate(pairs):
        lp = torch.tensor(logps[i], dtype=torch.float32)
        ref = None if ref_logps is None else torch.tensor(ref_logps[i], dtype=torch.float32)
        rewards = beta * candidate_scores(lp, ref, torch.tensor(lengths[i]), length_normalised)
        acc, margin = preference_accuracy(rewards, row_pairs)
        own, _ = preference_accuracy(lp, row_pairs)
        right, gap, likely = right + acc.item() * len(row_pairs), gap + margin.item() * len(row_pairs), \
            likely + own.item() * len(row_pairs)
        total += len(row_pairs)
    if not total:
        return {}
    return {"preference_accuracy": right / total, "reward_margin": gap / total, "logp_accuracy": likely / total}


class DPOEvaluator:
    """Held-out loss and implicit-reward statistics on every eval row, then greedy answers to the first
    `eval.num_generate` distinct held-out prompts, graded by `eval.checker` (reference shown: the best answer)."""

    def __init__(self, cfg: DPOConfig, table: pa.Table):
        self.cfg, self.objective = cfg, DPOObjective.of(cfg.loss)
        cols = table.to_pydict()
        self.num_rows, self.pairs = table.num_rows, cols["pairs"]
        self.ref_logps = cols.get(REF_COLUMN) if self.objective.needs_reference else None
        self.lengths = [[len(s) - len(p) for s in seqs] for p, seqs in zip(cols["prompt_ids"], cols["sequences"])]
        first_rows: dict[int, int] = {}
        for i, group in enumerate(cols["group"]):
            first_rows.setdefault(group, i)
        self.generate_rows = list(first_rows.values())[:cfg.eval.num_generate]
        self.prompts = [cols["prompt_text"][i] for i in self.generate_rows]
        self.references = [cols["responses"][i][cols["order"][i][0]] for i in self.generate_rows]
        self.metadata = [json.loads(cols["metadata"][i]) for i in self.generate_rows]

    def __call__(self, learners: LearnerGroup, eval_ref: ray.ObjectRef, step: int) -> dict[str, Any]:
        rows = list(range(self.num_rows))
        metrics: dict[str, Any] = {"loss": learners.evaluate(eval_ref, rows)["loss"]}
        logps = learners.score(eval_ref, rows)
        metrics.update(implicit_reward_metrics(logps, self.ref_logps, self.lengths, self.pairs, self.objective.beta,
                                               self.objective.pair_loss.length_normalised))
        if self.generate_rows:
            answers = learners.generate(eval_ref, self.generate_rows, self.cfg.eval.max_new_tokens)
            grades = grade_answers(self.cfg.eval.checker, self.metadata, answers)
            metrics.update(score_answers(self.metadata, grades))
            print_samples(self.prompts, self.references, answers, grades, self.cfg.eval.num_print, step)
        return metrics
