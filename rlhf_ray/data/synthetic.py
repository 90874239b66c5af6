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


# -- human-like feedback for the reward-model stage ---------------------------------------------------------


def _alphabet(task: str) -> str:
    return string.digits if task == "add" else _LETTERS


def _substitute(answer: str, positions: Iterable[int], alphabet: str, rng: random.Random) -> str:
    """`answer` with a different character at each of `positions`."""
    chars = list(answer)
    for i in positions:
        chars[i] = rng.choice([c for c in alphabet if c != answer[i]])
    return "".join(chars)


def corrupt(task: str, task_input: str, rng: random.Random, level: int) -> str:
    """A wrong answer to `task_input`, never equal to the right one; deterministic given `rng`.

    level 1: one character changed, or two neighbouring characters swapped; level 2: about half the
    characters changed (plus one appended to a one-character answer); level 3: the input copied back
    unchanged, or random characters of another length.
    """
    if level not in (1, 2, 3):
        raise ValueError(f"corruption level must be 1, 2 or 3, got {level!r}")
    answer, alphabet = solve(task, task_input), _alphabet(task)
    if level == 1:
        swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        if swaps and rng.random() < 0.5:
            i = rng.choice(swaps)
            return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
        return _substitute(answer, [rng.randrange(len(answer))], alphabet, rng)
    if level == 2:
        positions = rng.sample(range(len(answer)), k=max(1, (len(answer) + 1) // 2))
        wrong = _substitute(answer, positions, alphabet, rng)
        return wrong + rng.choice(alphabet) if len(answer) == 1 else wrong
    if rng.random() < 0.5 and task_input.strip() != answer:
        return task_input
    length = rng.choice([n for n in range(1, len(answer) + 4) if n != len(answer)])
    return "".join(rng.choice(alphabet) for _ in range(length))


def _prompt_fields(row: dict) -> dict:
    """The prompt as SFT renders it (instruction + "\\n" + input) and the fields a checker grades by."""
    return {"prompt": f"{row['instruction']}\n{row['input']}", "task": row["task"], "input": row["input"]}


def _pairwise_row(row: dict, rng: random.Random) -> dict:
    wrong = corrupt(row["task"], row["input"], rng, rng.randint(1, 3))
    return {**_prompt_fields(row), "chosen": row["output"], "rejected": wrong}


def _rated(row: dict, response: str) -> dict:
    score = round(1 + 4 * score_answer(row["task"], row["input"], response), 2)
    return {**_prompt_fields(row), "response": response, "score": score}


def _candidates(row: dict, rng: random.Random) -> list[tuple[int, str]]:
    """(level, response) for the right answer (level 0) and distinct corruptions of levels 1..3."""
    out = [(0, row["output"])]
    for level in (1, 2, 3):
        for _ in range(100):
            wrong = corrupt(row["task"], row["input"], rng, level)
            if all(wrong != text for _, text in out):
                break
        else:
            raise ValueError(f"could not draw a distinct level-{level} corruption for {row['input']!r}")
        out.append((level, wrong))
    return out


def _rating_rows(row: dict, rng: random.Random) -> list[dict]:
    """Two ratings of one prompt, for two distinct responses (right or corrupted), as raters give them."""
    return [_rated(row, text) for _, text in rng.sample(_candidates(row, rng), k=2)]


def _ranking_row(row: dict, rng: random.Random) -> dict:
    """Right answer + corruptions of levels 1..3, shuffled; ranking best first by score, then level."""
    candidates = _candidates(row, rng)
    rng.shuffle(candidates)
    key = [(-score_answer(row["task"], row["input"], text), level) for level, text in candidates]
    ranking = sorted(range(len(candidates)), key=key.__getitem__)
    return {**_prompt_fields(row), "responses": [text for _, text in candidates], "ranking": ranking}


def _feedback_files(rows: list[dict], rng: random.Random) -> dict[str, list[dict]]:
    """The rows of the pairwise, rating and ranking files for the prompts of `rows`, len(rows) each."""
    n = len(rows)
    ratings = [r for row in rows[:(n + 1) // 2] for r in _rating_rows(row, rng)][:n]
    return {"pairwise": [_pairwise_row(row, rng) for row in rows], "rating": ratings,
            "ranking": [_ranking_row(row, rng) for row in rows]}


def write_feedback_datasets(out_dir: str | os.PathLike, tasks: Sequence[str] = ("reverse",),
                            n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write `{pairwise,rating,ranking}_{train,eval}.jsonl`, `n_train`/`n_eval` rows each.

    pairwise: chosen = the right answer, rejected = a corruption of level 1..3; rating: two rated
    responses per prompt (right or corrupted), score = 1 + 4 * score_answer on a 1..5 scale; ranking: the
    right answer and corruptions of levels 1..3. Every row carries `task` and `input` for a checker, and
    eval prompts are never train prompts. Keys of the result: "pairwise_train", "pairwise_eval", ...
    """
    out = Path(out_dir)
    eval_rows = make_rows(tasks, n_eval, seed=seed * 1_000_003 + 11)
    train_rows = make_rows(tasks, n_train, seed=seed * 1_000_003 + 12,
                           exclude=((r["task"], r["input"]) for r in eval_rows))
    paths: dict[str, Path] = {}
    for offset, (split, rows) in enumerate((("train", train_rows), ("eval", eval_rows))):
        files = _feedback_files(rows, random.Random(seed * 1_000_003 + 13 + offset))
        for kind, file_rows in files.items():
            paths[f"{kind}_{split}"] = write_jsonl(file_rows, out / f"{kind}_{split}.jsonl")
    return paths


def write_label_candidates(out_dir: str | os.PathLike, tasks: Sequence[str] = ("sort",), n: int = 200,
                           seed: int = 0) -> dict[str, Path]:
    """Candidates for the labeling page (`rlhf-ray label`), rows `{prompt, responses, task, input}`:
    `label_pairs.jsonl` holds the right answer and one wrong one (level 1..3) per prompt, for pairwise
    labeling; `label_candidates.jsonl` the right answer and one wrong answer of each level, for ratings and
    rankings. Responses are shuffled. Keys of the result: "label_pairs", "label_candidates"."""
    rng = random.Random(seed * 1_000_003 + 21)
    pairs, lists = [], []
    for row in make_rows(tasks, n, seed=seed * 1_000_003 + 22):
        candidates = [text for _, text in _candidates(row, rng)]
        pair = [candidates[0], candidates[rng.randint(1, 3)]]
        rng.shuffle(pair)
        rng.shuffle(candidates)
        pairs.append({**_prompt_fields(row), "responses": pair})
        lists.append({**_prompt_fields(row), "responses": candidates})
    out = Path(out_dir)
    return {"label_pairs": write_jsonl(pairs, out / "label_pairs.jsonl"),
            "label_candidates": write_jsonl(lists, out / "label_candidates.jsonl")}
