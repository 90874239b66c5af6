"""Synthetic instruction tasks whose answers a rule can check.

A tiny model learns them on a CPU within minutes (measured in ../shared/STACK.md: a 0.5M-param model gets
`reverse` right after about a minute of SFT, `sort` partly, `add` depending on the seed), which makes them
the test and demo workload of every stage:

- SFT trains on `{instruction, input, output}` rows written as JSONL, exactly like a user's dataset;
- the reward-model stage turns right and wrong answers into preferences, ratings and rankings;
- the RLHF stage uses :func:`score_answer` as a rule-based reward.

Generation is seeded with `random.Random(seed)` (never Python's per-process string hash), so every process
and every machine makes the same files.
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

_LETTERS = string.ascii_lowercase


def _reverse(word: str) -> str:
    return word[::-1]


def _sort(word: str) -> str:
    return "".join(sorted(word))


def _add(pair: str) -> str:
    left, right = pair.split("+")
    return str(int(left) + int(right))


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))


def _random_sum(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)}+{rng.randint(0, 99)}"


@dataclass(frozen=True)
class Task:
    """One synthetic task: how to draw an input and how to solve it."""

    name: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]


TASKS: dict[str, Task] = {
    "reverse": Task("reverse", _random_word, _reverse),
    "sort": Task("sort", _random_word, _sort),
    "add": Task("add", _random_sum, _add),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def solve(task: str, task_input: str) -> str:
    """The one correct answer of `task` for `task_input`."""
    return get_task(task).solve(task_input)


def score_answer(task: str, task_input: str, response: str) -> float:
    """Graded correctness in [0, 1]: characters matching the answer position by position / the longer length.

    1.0 means exactly right. The grading (rather than 0/1) gives RL a signal on partly right answers and
    gives the reward-model stage graded ratings.
    """
    answer = solve(task, task_input)
    response = response.strip()
    if not answer and not response:
        return 1.0
    matches = sum(a == b for a, b in zip(answer, response))
    return matches / max(len(answer), len(response))


def is_correct(task: str, task_input: str, response: str) -> bool:
    return response.strip() == solve(task, task_input)


def make_rows(tasks: Sequence[str], n: int, seed: int, exclude: Iterable[tuple[str, str]] = ()) -> list[dict]:
    """`n` distinct rows cycling over `tasks`, in the `{instruction, input, output}` format plus `task`."""
    rng = random.Random(seed)
    seen = set(exclude)
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not draw {n} distinct rows for tasks {list(tasks)}: input space too small")
        task = get_task(tasks[len(rows) % len(tasks)])
        task_input = task.make_input(rng)
        if (task.name, task_input) in seen:
            continue
        seen.add((task.name, task_input))
        rows.append({"instruction": task.name, "input": task_input, "output": task.solve(task_input),
                     "task": task.name})
    return rows


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSONL atomically (temporary name, then rename), so a crash leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_sft_dataset(out_dir: str | os.PathLike, tasks: Sequence[str] = ("reverse", "sort", "add"),
                      n_train: int = 6000, n_eval: int = 300, seed: int = 0) -> dict[str, Path]:
    """Write `sft_train.jsonl` and `sft_eval.jsonl` (held-out inputs never seen in training)."""
    out = Path(out_dir)
    eval_rows = make_rows(tasks, n_eval, seed=seed * 1_000_003 + 1)
    train_rows = make_rows(tasks, n_train, seed=seed * 1_000_003 + 2,
                           exclude=((r["task"], r["input"]) for r in eval_rows))
    return {"train": write_jsonl(train_rows, out / "sft_train.jsonl"),
            "eval": write_jsonl(eval_rows, out / "sft_eval.jsonl")}


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text that the tiny tokenizer is trained on: every task's instructions, inputs and answers."""
    rows = make_rows(list(TASKS), n, seed=seed)
    return [f"{r['instruction']}\n{r['input']} {r['output']}" for r in rows] + [string.printable]
