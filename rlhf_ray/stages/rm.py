"""Reward-model training from human feedback: pairwise preferences, ratings and rankings.

The model is the base/SFT checkpoint with a one-output scoring head on the last token. Evaluation reports
held-out pairwise accuracy and mean margin (pairs, rankings) and Spearman correlation (ratings). The mean and
std of held-out rewards are saved next to the model (`reward_stats.json`) for the RLHF stage to normalise,
and every held-out candidate's reward goes to `<run>/eval_rewards.jsonl`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from tqdm.auto import tqdm

from rlhf_ray.algorithms.metrics import preference_metrics
from rlhf_ray.config import EvalConfig, RMConfig
from rlhf_ray.data.preference import load_preference_data
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.roles.learner import LearnerGroup
from rlhf_ray.roles.objectives import RewardObjective
from rlhf_ray.stages.supervised import StagePlan, StageResult, run_supervised

REWARD_STATS_FILE = "reward_stats.json"
EVAL_REWARDS_FILE = "eval_rewards.jsonl"


def run_rm(cfg: RMConfig) -> StageResult:
    tokenizer = load_tokenizer(cfg.model)
    data = load_preference_data(cfg.data, tokenizer, cfg.run.seed)  # validated before Ray starts
    evaluator = RMEvaluator(cfg.eval, data.eval)
    plan = StagePlan("rm", RewardObjective.of(cfg.loss), data.train, data.eval, data.stats, evaluator,
                     finalize=evaluator.write_stats)
    return run_supervised(plan, cfg)


class RMEvaluator:
    """Held-out loss, accuracy, margin, Spearman; remembers the last rewards for the saved statistics."""

    def __init__(self, cfg: EvalConfig, table: pa.Table):
        self.cfg = cfg
        columns = table.select(["kind", "order", "scores", "prompt_text", "responses"]).to_pydict()
        self.kinds, self.orders, self.targets = columns["kind"], columns["order"], columns["scores"]
        self.prompts, self.responses = columns["prompt_text"], columns["responses"]
        self.last: dict[str, Any] = {}
        self.last_rewards: list[list[float]] = []

    def __call__(self, learners: LearnerGroup, eval_ref: ray.ObjectRef, step: int) -> dict[str, Any]:
        rows = list(range(len(self.kinds)))
        metrics: dict[str, Any] = {"loss": learners.evaluate(eval_ref, rows)["loss"]}
        rewards = learners.score(eval_ref, rows)
        metrics.update(preference_metrics(self.kinds, self.orders, self.targets, rewards))
        self.last = {"step": step, **metrics}
        self.last_rewards = rewards
        for i in rows[:self.cfg.num_print]:
            shown = ", ".join(f"{text!r}: {r:+.3f}" for text, r in zip(self.responses[i], rewards[i]))
            best = self.responses[i][self.orders[i][0]]
            tqdm.write(f"  [step {step}] {self.prompts[i]!r:44.44} {self.kinds[i]}, best {best!r} | {shown}")
        return metrics

    def write_stats(self, learners: LearnerGroup, model_dir: Path) -> None:
        """`reward_stats.json`: mean/std of held-out rewards (and the eval they came from) for normalising."""
        if "reward_mean" not in self.last:
            tqdm.write(f"[rm] no held-out data: {REWARD_STATS_FILE} not written (RLHF will not normalise)")
            return
        stats = {"mean": self.last["reward_mean"], "std": self.last["reward_std"], "eval": self.last}
        _write_atomic(model_dir / REWARD_STATS_FILE, json.dumps(stats, indent=2))
        # Every held-out candidate with its reward, for inspection (one JSON object per feedback row).
        lines = (json.dumps({"prompt": p, "kind": k, "order": o, "responses": texts, "rewards": r})
                 for p, k, o, texts, r in zip(self.prompts, self.kinds, self.orders, self.responses,
                                              self.last_rewards))
        _write_atomic(model_dir.parent / EVAL_REWARDS_FILE, "".join(line + "\n" for line in lines))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
