"""Reward-model data: pairs, ratings and rankings in one table, bad rows located, prompt-disjoint eval splits."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from rlhf_ray.config import RewardDataConfig
from rlhf_ray.config_loader import ConfigError, config_help, load_config
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.preference import PREFERENCE_SCHEMA, load_preference_data
from rlhf_ray.data.sft import encode, render
from rlhf_ray.data.synthetic import TASKS, corrupt, score_answer, solve, write_feedback_datasets

PAIR = {"prompt": "reverse\nhello", "chosen": "olleh", "rejected": "hello", "task": "reverse"}
RATING = {"prompt": "reverse\nab", "response": "ba", "score": 4, "id": 1}
RANKING = {"prompt": "sort\ncab", "responses": ["abc", "cab", "acb"], "ranking": [0, 2, 1]}
CHAT_PAIR = {
    "chosen": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse\nab"},
               {"role": "assistant", "content": "ba"}],
    "rejected": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse\nab"},
                 {"role": "assistant", "content": "ab"}],
    "id": 3,
}


@pytest.fixture
def tok(tiny_tokenizer):
    return tiny_tokenizer


def write_jsonl(path: Path, rows: list[Any]) -> str:
    """Rows as JSON lines; a str row is written verbatim (for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def config(train: str, **overrides: Any) -> RewardDataConfig:
    return RewardDataConfig(train=train, **{"eval_fraction": 0.0, **overrides})


def load(tmp_path: Path, rows: list[Any], tok, **overrides: Any):
    return load_preference_data(config(write_jsonl(tmp_path / "d.jsonl", rows), **overrides), tok, seed=0)


def tokens(tok, user: str, response: str) -> list[int]:
    return encode(tok, render(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": response}]))


# --- formats and columns ------------------------------------------------------------------------

def test_pairwise_rows(tmp_path, tok):
    data = load(tmp_path, [PAIR, {**PAIR, "margin": 2}], tok)
    assert data.train.schema == PREFERENCE_SCHEMA
    first, second = data.train.to_pylist()
    assert first == {
        "kind": "pair", "sequences": [tokens(tok, "reverse\nhello", "olleh"), tokens(tok, "reverse\nhello", "hello")],
        "order": [0, 1], "scores": [], "margin": 0.0, "group": 0,
        "prompt_text": "<|user|>reverse\nhello<|end|><|assistant|>", "responses": ["olleh", "hello"],
        "metadata": json.dumps({"task": "reverse"}),
    }
    assert second["margin"] == 2.0 and second["group"] == 0  # same prompt, same group
    assert data.stats["train_file"]["format"] == "pairwise" and data.stats["train_kinds"] == {"pair": 2}


def test_messages_pairs_share_the_prompt(tmp_path, tok):
    row = load(tmp_path, [CHAT_PAIR], tok).train.to_pylist()[0]
    assert row["sequences"] == [encode(tok, render(tok, CHAT_PAIR["chosen"])),
                                encode(tok, render(tok, CHAT_PAIR["rejected"]))]
    assert row["prompt_text"] == render(tok, CHAT_PAIR["chosen"][:-1], generation_prompt=True)
    assert row["responses"] == ["ba", "ab"] and row["order"] == [0, 1] and json.loads(row["metadata"]) == {"id": 3}


def test_rating_rows_are_normalised_to_the_scale(tmp_path, tok):
    row = load(tmp_path, [RATING], tok).train.to_pylist()[0]
    assert (row["kind"], row["order"], row["scores"], row["margin"]) == ("rating", [0], [0.75], 0.0)
    assert row["sequences"] == [tokens(tok, "reverse\nab", "ba")] and json.loads(row["metadata"]) == {"id": 1}
    scaled = load(tmp_path, [{**RATING, "score": 2.5}], tok, rating_scale=(0.0, 10.0)).train
    assert scaled.column("scores").to_pylist() == [[0.25]]


def test_ranking_rows_keep_the_given_order(tmp_path, tok):
    data = load(tmp_path, [RANKING], tok)
    row = data.train.to_pylist()[0]
    assert (row["kind"], row["order"], row["scores"], row["margin"]) == ("ranking", [0, 2, 1], [], 0.0)
    assert row["sequences"] == [tokens(tok, "sort\ncab", r) for r in RANKING["responses"]]
    assert data.stats["train_sequences"] == 3


def test_prompt_may_be_a_message_list(tmp_path, tok):
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "reverse\nab"}]
    row = load(tmp_path, [{**RATING, "prompt": prompt}], tok).train.to_pylist()[0]
    assert row["sequences"] == [encode(tok, render(tok, [*prompt, {"role": "assistant", "content": "ba"}]))]
    assert row["prompt_text"] == render(tok, prompt, generation_prompt=True)


def test_format_is_detected_per_file_and_can_be_forced(tmp_path, tok):
    cfg = config(write_jsonl(tmp_path / "t.jsonl", ["", RATING]), eval=write_jsonl(tmp_path / "e.jsonl", [RANKING]))
    data = load_preference_data(cfg, tok, seed=0)
    assert data.stats["train_file"]["format"] == "rating" and data.stats["eval_file"]["format"] == "ranking"
    assert data.eval.column("kind").to_pylist() == ["ranking"] and data.stats["eval_from"] == "file"
    with pytest.raises(DataError, match=r"t.jsonl, line 1, field 'response': is missing; rating rows need"):
        load_preference_data(config(write_jsonl(tmp_path / "t.jsonl", [PAIR]), format="rating"), tok, 0)


# --- bad input ----------------------------------------------------------------------------------

def chat_pair(chosen: list, rejected: list) -> dict:
    def conv(turns):
        return [{"role": r, "content": c} for r, c in turns]
    return {"chosen": conv(chosen), "rejected": conv(rejected)}


BAD_ROWS = [
    (PAIR, {"prompt": "p", "chosen": "a"}, "field 'rejected': is missing"),
    (PAIR, {"chosen": "a", "rejected": "b"}, "field 'prompt': is missing"),
    (PAIR, {"prompt": "p", "chosen": 5, "rejected": "b"}, "field 'chosen': must be a string (got int)"),
    (PAIR, {"prompt": " ", "chosen": "a", "rejected": "b"}, "field 'prompt': must be a non-empty string"),
    (PAIR, {"prompt": "p", "chosen": "a", "rejected": ""}, "field 'rejected': must be a non-empty string"),
    (PAIR, {"prompt": "p", "chosen": "a", "rejected": "a"}, "field 'rejected': must differ from 'chosen'"),
    (PAIR, {**PAIR, "margin": "big"}, "field 'margin': must be a finite number"),
    (PAIR, chat_pair([("user", "x"), ("assistant", "a")], [("user", "y"), ("assistant", "b")]),
     "field 'rejected': must share every message but the last"),
    (PAIR, chat_pair([("user", "x"), ("assistant", "a")], [("user", "x")]),
     "field 'rejected': must be prompt messages followed by an assistant message"),
    (PAIR, chat_pair([("assistant", "a")], [("assistant", "b")]), "field 'chosen': must be prompt messages"),
    (PAIR, chat_pair([("user", "x"), ("bot", "a")], [("user", "x"), ("assistant", "b")]),
     "field 'chosen[1]': must be an object with 'role'"),
    (PAIR, chat_pair([("user", "x"), ("assistant", " ")], [("user", "x"), ("assistant", "b")]),
     "field 'chosen[1].content': must be non-empty"),
    (RATING, {"prompt": "p", "response": "r"}, "field 'score': is missing"),
    (RATING, {**RATING, "score": 6}, "field 'score': must be within the rating scale [1, 5]"),
    (RATING, {**RATING, "score": 0.5}, "field 'score': must be within the rating scale [1, 5]"),
    (RATING, {**RATING, "score": "5"}, "field 'score': must be a finite number"),
    (RATING, {**RATING, "score": True}, "field 'score': must be a finite number"),
    (RATING, {**RATING, "response": ""}, "field 'response': must be a non-empty string"),
    (RATING, {**RATING, "prompt": []}, "field 'prompt': must be a non-empty list"),
    (RANKING, {**RANKING, "responses": ["a", "b", "c", ""], "ranking": [0, 1, 2, 3]},
     "field 'responses[3]': must be a non-empty string"),
    (RANKING, {**RANKING, "responses": ["a", "b", "a"]}, "field 'responses[2]': duplicates responses[0]"),
    (RANKING, {**RANKING, "responses": ["a"], "ranking": [0]}, "field 'responses': must be a list of at least 2"),
    (RANKING, {**RANKING, "ranking": [0, 1, 1]}, "field 'ranking': must be a permutation of 0..2"),
    (RANKING, {**RANKING, "ranking": [0, 1]}, "field 'ranking': must be a permutation of 0..2: each index"),
    (RANKING, {**RANKING, "ranking": [0, 1, 3]}, "field 'ranking': must be a permutation"),
    (RANKING, {k: v for k, v in RANKING.items() if k != "ranking"}, "field 'ranking': is missing"),
    (PAIR, "{oops", "not valid JSON"),
    (PAIR, [PAIR], "expected a JSON object"),
]


@pytest.mark.parametrize("good, bad, message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(good, bad, message, tmp_path, tok):
    source = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(DataError) as info:
        load_preference_data(config(source), tok, seed=0)
    assert "bad.jsonl, line 2" in str(info.value) and message in str(info.value)


def test_bad_rows_of_json_files_are_0_based_rows(tmp_path, tok):
    (tmp_path / "bad.json").write_text(json.dumps([PAIR, {**PAIR, "rejected": PAIR["chosen"]}]))
    with pytest.raises(DataError, match=r"bad.json, row 1, field 'rejected': must differ"):
        load_preference_data(config(str(tmp_path / "bad.json")), tok, seed=0)


def test_skip_invalid_counts_instead_of_raising(tmp_path, tok):
    rows = [RATING, {**RATING, "score": 9}, "{", {**RATING, "score": 0}, {**RATING, "response": ""}]
    data = load(tmp_path, rows, tok, skip_invalid=True)
    stats = data.stats["train_file"]
    assert data.train.num_rows == 1 and (stats["rows_read"], stats["rows_kept"]) == (5, 1)
    assert stats["skipped"] == {"field 'score': must be within the rating scale [1, 5] (set data.rating_scale)": 2,
                                "not valid JSON": 1, "field 'response': must be a non-empty string": 1}
    json.dumps(data.stats)
    with pytest.raises(DataError, match="no valid rows"):
        load(tmp_path, ["{", {**RATING, "score": 9}], tok, skip_invalid=True)


def test_overlong_rows_are_dropped_whole(tmp_path, tok):
    long_pair = {**PAIR, "rejected": "x" * 40}
    limit = len(tokens(tok, PAIR["prompt"], PAIR["chosen"])) + 2
    short = {"prompt": "reverse\nab", "chosen": "ba", "rejected": "ab"}
    data = load(tmp_path, [PAIR, long_pair, short], tok, max_length=limit)
    assert data.train.column("responses").to_pylist() == [["olleh", "hello"], ["ba", "ab"]]
    assert data.stats["train_file"]["dropped"] == {"longer than max_length": 1}
    assert data.stats["train_file"]["rows_kept"] == 2
    with pytest.raises(DataError, match="every row has a candidate longer than data.max_length=8"):
        load(tmp_path, [PAIR], tok, max_length=8)


# --- ratings to pairs ---------------------------------------------------------------------------

def test_ratings_of_a_prompt_become_pairs(tmp_path, tok):
    a = {"prompt": "reverse\nab", "task": "reverse"}
    rows = [{**a, "response": "aa", "score": 3}, {**a, "response": "ba", "score": 5},
            {"prompt": "other", "response": "x", "score": 2}, {**a, "response": "bb", "score": 3}]
    data = load(tmp_path, rows, tok, ratings_to_pairs=True)
    pairs = data.train.to_pylist()
    assert [p["responses"] for p in pairs] == [["ba", "aa"], ["ba", "bb"]]  # aa vs bb: a tie, skipped
    assert all(p["kind"] == "pair" and p["order"] == [0, 1] and p["scores"] == [] for p in pairs)
    assert pairs[0]["sequences"] == [tokens(tok, "reverse\nab", "ba"), tokens(tok, "reverse\nab", "aa")]
    assert {p["group"] for p in pairs} == {0}
    assert json.loads(pairs[0]["metadata"]) == {"task": "reverse", "from_ratings": [1.0, 0.5]}
    stats = data.stats["train_file"]
    assert (stats["pairs_from_ratings"], stats["rating_ties_skipped"], stats["kinds"]) == (2, 1, {"pair": 2})
    assert load(tmp_path, rows, tok).stats["train_kinds"] == {"rating": 4}  # off by default
    with pytest.raises(DataError, match="ratings_to_pairs made no pairs"):
        load(tmp_path, rows[:1] + rows[3:], tok, ratings_to_pairs=True)


# --- eval split ---------------------------------------------------------------------------------

def prompts(table: pa.Table) -> set[str]:
    return set(table.column("prompt_text").to_pylist())


def test_eval_split_is_seeded_and_prompt_disjoint(tmp_path, tok):
    rows = [{"prompt": f"p{i}", "chosen": f"c{j}", "rejected": "r", "i": i} for i in range(40) for j in range(2)]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    first, again, other = (load_preference_data(config(source, eval_fraction=0.25), tok, seed=s) for s in (1, 1, 2))
    assert first.eval.num_rows == 20 and first.stats["eval_groups"] == 10 and first.stats["train_groups"] == 30
    assert prompts(first.eval).isdisjoint(prompts(first.train))
    assert first.eval.to_pylist() == again.eval.to_pylist() and prompts(first.eval) != prompts(other.eval)
    assert first.train.num_rows + first.eval.num_rows == 80 and first.stats["eval_from"] == "train"
    capped = load_preference_data(config(source, eval_fraction=0.5, max_eval_samples=3), tok, seed=1)
    assert capped.eval.num_rows == 3 and prompts(capped.eval).isdisjoint(prompts(capped.train))


def test_eval_file_is_capped_and_no_eval_is_an_empty_table(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [PAIR])
    evals = write_jsonl(tmp_path / "e.jsonl", [{**PAIR, "prompt": f"p{i}"} for i in range(10)])
    data = load_preference_data(config(train, eval=evals, max_eval_samples=4, eval_fraction=0.5), tok, seed=0)
    assert (data.train.num_rows, data.eval.num_rows) == (1, 4)
    none = load_preference_data(config(train, eval_fraction=0.5), tok, seed=0)  # one prompt: nothing to hold out
    assert none.eval.num_rows == 0 and none.eval.schema == PREFERENCE_SCHEMA and none.stats["eval_from"] == "none"
    json.dumps(none.stats)


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [(1.0,), (1.0, 2.0, 3.0), (5.0, 1.0), (2.0, 2.0), (float("nan"), 1.0)])
def test_rating_scale_must_be_lo_below_hi(scale):
    with pytest.raises(ConfigError, match=r"data\.rating_scale: expected two numbers \[lo, hi\] with lo < hi"):
        RewardDataConfig(train="t.jsonl", rating_scale=scale)


def test_reward_data_config_loads_and_documents_every_field():
    cfg = load_config(RewardDataConfig, None, ["train=t.jsonl", "rating_scale=[0,10]", "format=ranking"])
    assert cfg.rating_scale == (0.0, 10.0) and cfg.format == "ranking" and not cfg.ratings_to_pairs
    with pytest.raises(ConfigError, match=r"data\.rating_scale"):
        load_config(RewardDataConfig, None, ["rating_scale=[3,1]"])
    with pytest.raises(ConfigError, match="one of 'auto', 'pairwise', 'rating', 'ranking'"):
        load_config(RewardDataConfig, None, ["format=pairs"])
    text = config_help(RewardDataConfig)
    for name in ("train", "eval", "eval_fraction", "max_eval_samples", "format", "split", "max_length",
                 "skip_invalid", "rating_scale", "ratings_to_pairs"):
        assert f"  {name} = " in text, name


# --- synthetic feedback -------------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(TASKS))
def test_corrupt_is_never_right_and_seeded(task):
    rng = random.Random(0)
    inputs = [TASKS[task].make_input(rng) for _ in range(200)] + (["aaa", "abc", "cba"] if task != "add" else
                                                                  ["0+0", "5+4", "99+99"])
    for i, task_input in enumerate(inputs):
        for level in (1, 2, 3):
            wrong = corrupt(task, task_input, random.Random(i), level)
            assert wrong and wrong != solve(task, task_input) and score_answer(task, task_input, wrong) < 1
            assert wrong == corrupt(task, task_input, random.Random(i), level)
    with pytest.raises(ValueError, match="level"):
        corrupt(task, inputs[0], rng, 4)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def feedback(tmp_path_factory) -> dict[str, Path]:
    return write_feedback_datasets(tmp_path_factory.mktemp("fb"), tasks=("reverse", "sort", "add"),
                                   n_train=60, n_eval=12, seed=3)


def test_synthetic_feedback_loads_cleanly(feedback, tok):
    assert sorted(feedback) == sorted(f"{k}_{s}" for k in ("pairwise", "rating", "ranking") for s in ("train", "eval"))
    for kind in ("pairwise", "rating", "ranking"):
        cfg = RewardDataConfig(train=str(feedback[f"{kind}_train"]), eval=str(feedback[f"{kind}_eval"]))
        data = load_preference_data(cfg, tok, seed=0)
        for name, n in (("train_file", 60), ("eval_file", 12)):
            stats = data.stats[name]
            assert (stats["format"], stats["rows_read"], stats["rows_kept"], stats["skipped"], stats["dropped"]) \
                == (kind, n, n, {}, {})
    pairs = load_preference_data(RewardDataConfig(train=str(feedback["rating_train"]), ratings_to_pairs=True,
                                                  eval_fraction=0.0), tok, seed=0)
    assert pairs.stats["train_file"]["pairs_from_ratings"] > 0


def test_synthetic_feedback_is_graded_consistently(feedback):
    for row in read(feedback["pairwise_train"]):
        assert row["prompt"] == f"{row['task']}\n{row['input']}"
        assert score_answer(row["task"], row["input"], row["chosen"]) == 1.0
        assert score_answer(row["task"], row["input"], row["rejected"]) < 1.0
    for row in read(feedback["rating_train"]):
        assert row["score"] == round(1 + 4 * score_answer(row["task"], row["input"], row["response"]), 2)
    for row in read(feedback["ranking_train"]):
        scores = [score_answer(row["task"], row["input"], row["responses"][i]) for i in row["ranking"]]
        assert len(row["responses"]) == 4 and scores[0] == 1.0 and scores == sorted(scores, reverse=True)


def test_synthetic_feedback_is_seeded_and_eval_disjoint(feedback, tmp_path):
    again = write_feedback_datasets(tmp_path / "again", tasks=("reverse", "sort", "add"), n_train=60, n_eval=12,
                                    seed=3)
    other = write_feedback_datasets(tmp_path / "other", tasks=("reverse", "sort", "add"), n_train=60, n_eval=12,
                                    seed=4)
    for key, path in feedback.items():
        assert path.read_bytes() == again[key].read_bytes() != other[key].read_bytes()
        assert len(read(path)) == (60 if key.endswith("train") else 12)
    for kind in ("pairwise", "rating", "ranking"):
        train = {r["prompt"] for r in read(feedback[f"{kind}_train"])}
        held = {r["prompt"] for r in read(feedback[f"{kind}_eval"])}
        assert train.isdisjoint(held)
