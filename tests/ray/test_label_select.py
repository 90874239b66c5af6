"""`select: uncertainty` on real reward models: labels the seed reward model is unsure of teach it more.

The experiment (seeded; synthetic feedback, so the "annotator" is the task's checker):
1. a pool of `sort` pairs (right answer vs a corruption of level 1..3) shown as unlabeled candidates;
2. a seed reward model trained on a few hundred labels;
3. 200 pool items picked by `load_items` with `select: uncertainty` (the seed model's smallest margins), and
   200 picked with `select: random`;
4. the seed model fine-tuned on the seed labels + each 200, for the same steps at a gentle learning rate;
5. held-out pairwise accuracy (400 pairs) of the two.

What was measured while choosing these sizes (held-out accuracy seed -> uncertainty / random): with a weak
seed model (64 labels, 40 steps: 0.685; 128 labels, 100 steps: 0.765) random labels won (0.825 / 0.86,
0.78 / 0.83, 0.825 / 0.84): a poor model's small margins are mostly pairs it cannot yet learn, the known
cold-start failure of uncertainty sampling. With a 400-label seed model (0.895) fine-tuned at lr 1e-3 both
fell below the seed; at lr 2e-4 random labels (mostly pairs it already ranks right by a wide margin) left it
where it was and uncertainty-picked ones raised it (seeds 0, 1, 2 below).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlhf_ray.config import RMConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.synthetic import is_correct, write_feedback_datasets, write_jsonl
from rlhf_ray.label.config import LabelConfig
from rlhf_ray.label.items import LabelItem, load_items
from rlhf_ray.stages.common import read_metrics
from rlhf_ray.stages.rm import run_rm

SEED_LABELS = 400
POOL = 2000
PICK = 200
SEED_STEPS = 150
RETRAIN_STEPS = 60
HELD_OUT = 400
RETRAIN_LR = 2e-4


def rm_config(train: Path, held_out: Path, out: Path, name: str, steps: int, *overrides: str) -> RMConfig:
    return load_config(RMConfig, None, [
        f"data.train={train}", f"data.eval={held_out}", "data.max_length=48", f"run.output_dir={out}",
        f"run.name={name}", "run.resume=never", f"run.max_steps={steps}", "learner.num_ranks=2",
        "learner.zero_stage=2", "learner.micro_batch_size=16", "learner.lr=1e-3", "learner.warmup_steps=10",
        "eval.num_print=0", "eval.at_start=false", *overrides])


def final_accuracy(run_dir: Path) -> float:
    return [m for m in read_metrics(run_dir) if m["split"] == "eval"][-1]["accuracy"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_candidates(pool: list[dict], path: Path, seed: int) -> Path:
    """The pool as the labeling page sees it: the two responses of each pair in a seeded random order."""
    rng = random.Random(seed)
    rows = []
    for row in pool:
        pair = [row["chosen"], row["rejected"]]
        rng.shuffle(pair)
        rows.append({"prompt": row["prompt"], "responses": pair, "task": row["task"], "input": row["input"]})
    return write_jsonl(rows, path)


def annotate(items: list[LabelItem]) -> list[dict]:
    """The synthetic annotator: prefers the right answer (the checker knows it)."""
    rows = []
    for item in items:
        right = [is_correct(item.extra["task"], item.extra["input"], r) for r in item.responses]
        assert sum(right) == 1, item
        chosen = right.index(True)
        rows.append({"prompt": item.prompt, "chosen": item.responses[chosen],
                     "rejected": item.responses[1 - chosen]})
    return rows


def compare_selections(tmp: Path, seed: int) -> dict[str, float]:
    """Held-out accuracy of the seed model and of its retrainings on uncertainty- and randomly-picked labels."""
    files = write_feedback_datasets(tmp / "data", tasks=("sort",), n_train=SEED_LABELS + POOL, n_eval=HELD_OUT,
                                    seed=seed)
    rows = read_rows(files["pairwise_train"])
    seed_file = write_jsonl(rows[:SEED_LABELS], tmp / "seed_labels.jsonl")
    seed_run = run_rm(rm_config(seed_file, files["pairwise_eval"], tmp / "runs", "seed", SEED_STEPS,
                                f"run.seed={seed * 100}"))
    candidates = write_candidates(rows[SEED_LABELS:], tmp / "pool.jsonl", seed)
    picks = {"uncertainty": [f"select_models=[{seed_run.model_dir}]"], "random": []}
    accuracy = {"seed": final_accuracy(seed_run.run_dir)}
    for select, extra in picks.items():
        cfg = load_config(LabelConfig, None, [f"candidates={candidates}", f"output_dir={tmp / select}",
                                              f"select={select}", f"max_items={PICK}", f"seed={seed}", *extra])
        items = load_items(cfg).items
        assert len(items) == PICK
        labels = rows[:SEED_LABELS] + annotate(items)
        train = write_jsonl(labels, tmp / f"{select}_labels.jsonl")
        run = run_rm(rm_config(train, files["pairwise_eval"], tmp / "runs", select, RETRAIN_STEPS,
                               f"model.path={seed_run.model_dir}", f"run.seed={seed}",
                               f"learner.lr={RETRAIN_LR}"))
        accuracy[select] = final_accuracy(run.run_dir)
    return accuracy


@pytest.mark.parametrize("seed", [0])
def test_uncertainty_picked_labels_beat_random_ones(ray_cluster, tmp_path, seed):
    accuracy = compare_selections(tmp_path, seed)
    print(f"[label select] seed {seed}: held-out accuracy {accuracy}")
    # Measured here: seed 0 0.895 -> 0.92 / 0.8925 (uncertainty / random); seeds 1, 2 (not run, for time):
    # 0.90 -> 0.94 / 0.93 and 0.87 -> 0.91 / 0.89 (gains of 4-11 of the 400 held-out pairs). Float rounding
    # differs between CPU kinds (see tests/ray/test_rlhf.py), so the bar is "beats": more pairs right.
    assert accuracy["uncertainty"] > accuracy["random"], accuracy
    assert accuracy["uncertainty"] > accuracy["seed"], accuracy
