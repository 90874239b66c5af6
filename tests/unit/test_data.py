"""Data loading: sources, row formats, the assistant-only loss mask, errors that locate bad rows, splits."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from rlhf_ray.config import DataConfig
from rlhf_ray.data.errors import ChatTemplateError, DataError
from rlhf_ray.data.loading import Record, collect_valid, read_records
from rlhf_ray.data.sft import SFT_SCHEMA, format_prompt, load_sft_data
from rlhf_ray.models.tiny import resolve_model_path

HELLO = {"instruction": "reverse", "input": "hello", "output": "olleh", "task": "reverse"}
CHAT = {"messages": [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "reverse\nab"},
    {"role": "assistant", "content": "ba"},
], "id": 7}


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return resolve_model_path("tiny:tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


def write_jsonl(path: Path, rows: list[Any]) -> str:
    """Rows as JSON lines; a str row is written verbatim (for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def numbered(n: int) -> list[dict]:
    return [{"instruction": "reverse", "input": f"w{i}", "output": f"{i}w", "id": i} for i in range(n)]


def config(train: str, **overrides: Any) -> DataConfig:
    return DataConfig(train=train, **{"eval_fraction": 0.0, **overrides})


def runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def masked_text(tokenizer, row: dict) -> list[str]:
    return [tokenizer.decode(row["input_ids"][a:b]) for a, b in runs(row["loss_mask"])]


# --- errors -------------------------------------------------------------------------------------

def test_data_error_reads_as_a_location():
    err = DataError("data/train.jsonl", "must be a non-empty string", row=7, field="output")
    assert str(err) == "data/train.jsonl, line 7, field 'output': must be a non-empty string"
    assert (err.source, err.row, err.field, err.message) == ("data/train.jsonl", 7, "output",
                                                              "must be a non-empty string")
    assert str(DataError("d.parquet", "expected a JSON object", row=0, detail="got list")) == \
        "d.parquet, row 0: expected a JSON object (got list)"
    assert str(DataError("d.json", "dataset is empty")) == "d.json: dataset is empty"
    assert err.reason == "field 'output': must be a non-empty string"
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is DataError and str(copy) == str(err)


# --- sources ------------------------------------------------------------------------------------

def write_source(kind: str, tmp_path: Path, rows: list[dict]) -> str:
    import datasets

    if kind == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows)
    if kind == "json":
        (tmp_path / "d.json").write_text(json.dumps(rows))
        return str(tmp_path / "d.json")
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    if kind == "saved":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    if kind == "saved_dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                              "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
        return str(tmp_path / "dd")
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "part.jsonl", rows)
    return str(tmp_path / "files")


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved", "saved_dict", "data_dir"])
def test_every_source_kind_gives_the_same_rows(kind, tmp_path, tokenizer, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = numbered(3)
    source = write_source(kind, tmp_path, rows)
    split = "test" if kind == "saved_dict" else "train"
    records = list(read_records(source, split=split))
    assert [r.value for r in records] == rows
    if kind == "jsonl":
        assert [(r.index, r.kind) for r in records] == [(1, "line"), (2, "line"), (3, "line")]
    else:
        assert [(r.index, r.kind) for r in records] == [(0, "row"), (1, "row"), (2, "row")]
    data = load_sft_data(config(source, split=split), tokenizer, seed=0)
    assert [json.loads(m)["id"] for m in data.train.column("metadata").to_pylist()] == [0, 1, 2]


def test_jsonl_skips_blank_lines_and_yields_bad_lines_as_errors(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [HELLO, "", "{not json", "[1, 2]", HELLO])
    records = list(read_records(source))
    assert [r.index for r in records] == [1, 3, 4, 5]
    assert isinstance(records[1].value, DataError) and "line 3: not valid JSON" in str(records[1].value)
    assert str(records[2].value) == f"{source}, line 4: expected a JSON object (got list)"


@pytest.mark.parametrize("name, message", [
    ("missing.jsonl", "missing.jsonl: file not found"),
    ("missing.parquet", "missing.parquet: file not found"),
    ("data.txt", "unsupported file type '.txt'"),
    ("empty_dir", "is neither a .jsonl/.json/.parquet file nor a dataset"),
])
def test_unopenable_sources_raise_at_once(name, message, tmp_path):
    if name == "data.txt":
        (tmp_path / name).write_text("hello")
    if name == "empty_dir":
        (tmp_path / name).mkdir()
    with pytest.raises(DataError) as info:
        read_records(str(tmp_path / name))
    assert message in str(info.value)


def test_missing_split_of_a_saved_dataset_dict(tmp_path):
    source = write_source("saved_dict", tmp_path, numbered(2))
    with pytest.raises(DataError, match="has no split 'validation'.*available: train, test"):
        read_records(source, split="validation")


def test_json_file_must_hold_a_list(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="must hold a list of objects"):
        read_records(str(tmp_path / "d.json"))


def test_collect_valid_raises_or_counts():
    good = Record("d.json", 0, "row", {"x": 1})
    bad = Record("d.json", 1, "row", DataError("d.json", "not valid JSON", row=1, detail="column 3: oops"))

    def validate(record: Record) -> int:
        if record.value["x"] < 0:
            raise record.error("must be positive", field="x")
        return record.value["x"]

    negative = Record("d.json", 2, "row", {"x": -1})
    with pytest.raises(DataError, match="d.json, row 1: not valid JSON"):
        collect_valid([good, bad], validate, skip_invalid=False)
    valid, skipped = collect_valid([good, bad, negative, negative], validate, skip_invalid=True)
    assert valid == [1] and skipped == {"not valid JSON": 1, "field 'x': must be positive": 2}
    with pytest.raises(DataError, match="d.json: no valid rows.*3 rows skipped"):
        collect_valid([bad, negative, negative], validate, skip_invalid=True)
    with pytest.raises(DataError, match="e.jsonl: dataset is empty"):
        collect_valid([], validate, skip_invalid=True, source="e.jsonl")


# --- formats and the loss mask ------------------------------------------------------------------

def test_instruction_row_masks_exactly_the_response(tmp_path, tokenizer):
    data = load_sft_data(config(write_jsonl(tmp_path / "d.jsonl", [HELLO])), tokenizer, seed=0)
    row = data.train.to_pylist()[0]
    assert data.train.schema == SFT_SCHEMA and len(row["input_ids"]) == len(row["loss_mask"])
    assert masked_text(tokenizer, row) == ["olleh<|end|>"]
    assert row["prompt_text"] == format_prompt(tokenizer, "reverse\nhello") == \
        "<|user|>reverse\nhello<|end|><|assistant|>"
    assert row["prompt_ids"] == row["input_ids"][:len(row["prompt_ids"])]
    assert tokenizer.decode(row["prompt_ids"]) == row["prompt_text"]
    assert row["reference"] == "olleh"
    assert json.loads(row["metadata"]) == {"instruction": "reverse", "input": "hello", "task": "reverse"}


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}])
def test_empty_input_leaves_the_instruction_alone(extra, tmp_path, tokenizer):
    row = {"instruction": "say hi", "output": "hi", **extra}
    data = load_sft_data(config(write_jsonl(tmp_path / "d.jsonl", [row])), tokenizer, seed=0)
    assert data.train.column("prompt_text")[0].as_py() == "<|user|>say hi<|end|><|assistant|>"
    assert json.loads(data.train.column("metadata")[0].as_py())["instruction"] == "say hi"


def test_messages_row_masks_every_assistant_turn(tmp_path, tokenizer):
    data = load_sft_data(config(write_jsonl(tmp_path / "d.jsonl", [CHAT])), tokenizer, seed=0)
    row = data.train.to_pylist()[0]
    assert masked_text(tokenizer, row) == ["yo<|end|>", "ba<|end|>"]
    assert row["prompt_text"] == ("<|system|>be brief<|end|><|user|>hi<|end|><|assistant|>yo<|end|>"
                                  "<|user|>reverse\nab<|end|><|assistant|>")
    assert row["reference"] == "ba" and json.loads(row["metadata"]) == {"id": 7}
    assert data.stats["train_response_tokens"] == 6


def test_format_is_detected_per_file(tmp_path, tokenizer):
    evals = write_jsonl(tmp_path / "e.jsonl", [CHAT])
    cfg = config(write_jsonl(tmp_path / "t.jsonl", ["", HELLO]), eval=evals)
    data = load_sft_data(cfg, tokenizer, seed=0)
    assert data.stats["train_file"]["format"] == "instruction"
    assert data.stats["eval_file"]["format"] == "messages"
    assert data.eval.column("reference").to_pylist() == ["ba"] and data.stats["eval_from"] == "file"


def test_explicit_format_is_enforced(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"t.jsonl, line 1, field 'messages': is missing"):
        load_sft_data(config(write_jsonl(tmp_path / "t.jsonl", [HELLO]), format="messages"), tokenizer, 0)


# --- bad input ----------------------------------------------------------------------------------

def chat(*messages: tuple[Any, Any]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


BAD_ROWS = [
    (HELLO, '{"instruction": "reverse",', "not valid JSON"),
    (HELLO, [HELLO], "expected a JSON object"),
    (HELLO, {"instruction": "reverse", "input": "ab"}, "field 'output': is missing"),
    (HELLO, {"input": "ab", "output": "ba"}, "field 'instruction': is missing"),
    (HELLO, {"instruction": "reverse", "output": 5}, "field 'output': must be a string (got int)"),
    (HELLO, {"instruction": "reverse", "input": ["a"], "output": "a"}, "field 'input': must be a string"),
    (HELLO, {"instruction": "reverse", "output": "  "}, "field 'output': must be a non-empty string"),
    (CHAT, {"messages": []}, "field 'messages': must be a non-empty list"),
    (CHAT, {"messages": "hi"}, "field 'messages': must be a non-empty list"),
    (CHAT, chat(("user", "hi"), ("bot", "yo")),
     "field 'messages[1].role': must be one of system, user, assistant (got 'bot')"),
    (CHAT, chat(("user", "hi"), ("assistant", "yo"), ("user", "and?")),
     "field 'messages[2].role': the last message must be the assistant's"),
    (CHAT, chat(("user", None), ("assistant", "yo")), "field 'messages[0].content': must be a string"),
    (CHAT, chat(("user", "hi"), ("assistant", "")), "field 'messages[1].content': must be non-empty"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}, "yo"]}, "field 'messages[1]': must be an object"),
]


@pytest.mark.parametrize("good, bad, message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(good, bad, message, tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(DataError) as info:
        load_sft_data(config(source), tokenizer, seed=0)
    assert "bad.jsonl, line 2" in str(info.value) and message in str(info.value)


def test_bad_rows_of_json_files_are_0_based_rows(tmp_path, tokenizer):
    (tmp_path / "bad.json").write_text(json.dumps([HELLO, {"instruction": "reverse", "output": ""}]))
    with pytest.raises(DataError, match=r"bad.json, row 1, field 'output': must be a non-empty string"):
        load_sft_data(config(str(tmp_path / "bad.json")), tokenizer, seed=0)


def test_empty_and_missing_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="empty.jsonl: dataset is empty"):
        load_sft_data(config(write_jsonl(tmp_path / "empty.jsonl", ["", "  "])), tokenizer, seed=0)
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_sft_data(config(str(tmp_path / "nope.jsonl")), tokenizer, seed=0)


def test_skip_invalid_counts_instead_of_raising(tmp_path, tokenizer):
    bad_output = {"instruction": "reverse", "output": ""}
    source = write_jsonl(tmp_path / "d.jsonl", [HELLO, "{oops", bad_output, HELLO, bad_output, [1]])
    data = load_sft_data(config(source, skip_invalid=True), tokenizer, seed=0)
    stats = data.stats["train_file"]
    assert data.train.num_rows == 2 and stats["rows_read"] == 6 and stats["rows_kept"] == 2
    assert stats["skipped"] == {"not valid JSON": 1, "field 'output': must be a non-empty string": 2,
                                "expected a JSON object": 1}
    json.dumps(data.stats)
    with pytest.raises(DataError, match="no valid rows"):
        load_sft_data(config(write_jsonl(tmp_path / "all_bad.jsonl", ["{", bad_output]), skip_invalid=True),
                      tokenizer, seed=0)


# --- chat templates -----------------------------------------------------------------------------

def test_template_problems(tmp_path, tiny_path):
    source = write_jsonl(tmp_path / "d.jsonl", [HELLO])
    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        load_sft_data(config(source), tok, seed=0)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        format_prompt(tok, "hi")
    # Like templates that mark a finished conversation differently from a prompt: masking is impossible.
    tok.chat_template = ("{% if not add_generation_prompt %}<|bos|>{% endif %}{% for m in messages %}"
                         "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(ChatTemplateError, match=r"d.jsonl, line 1: the chat template is not prefix-cons"):
        load_sft_data(config(source, skip_invalid=True), tok, seed=0)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('system messages are not supported') }}{% endif %}"
                         "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(DataError, match=r"line 1: the chat template rejected this conversation \(system"):
        load_sft_data(config(write_jsonl(tmp_path / "c.jsonl", [CHAT])), tok, seed=0)


# --- length -------------------------------------------------------------------------------------

def test_overlong_rows_are_truncated_or_dropped(tmp_path, tokenizer):
    long_prompt = {"instruction": "reverse " * 5, "input": "abc", "output": "cba"}
    short = {"instruction": "reverse", "input": "ab", "output": "ba"}
    source = write_jsonl(tmp_path / "d.jsonl", [HELLO, short, long_prompt])
    full = load_sft_data(config(source), tokenizer, seed=0).train.to_pylist()
    hello_prompt = len(full[0]["prompt_ids"])
    assert len(full[1]["input_ids"]) <= hello_prompt + 2 < len(full[0]["input_ids"])
    assert len(full[2]["prompt_ids"]) > hello_prompt + 2

    cut = load_sft_data(config(source, max_length=hello_prompt + 2), tokenizer, seed=0)
    assert cut.train.num_rows == 2
    assert cut.stats["train_file"]["truncated"] == 1
    assert cut.stats["train_file"]["dropped"] == {"prompt longer than max_length": 1}
    row = cut.train.to_pylist()[0]
    assert row["input_ids"] == full[0]["input_ids"][:hello_prompt + 2]
    assert masked_text(tokenizer, row) == ["ol"]
    assert row["reference"] == "olleh"

    dropped = load_sft_data(config(source, max_length=hello_prompt + 2, overlong="drop"), tokenizer, seed=0)
    assert dropped.train.column("reference").to_pylist() == ["ba"]
    assert dropped.stats["train_file"]["truncated"] == 0
    assert dropped.stats["train_file"]["dropped"] == {"longer than max_length": 2}
    with pytest.raises(DataError, match="every row is longer than data.max_length=8"):
        load_sft_data(config(source, max_length=8, overlong="drop"), tokenizer, seed=0)


# --- eval split ---------------------------------------------------------------------------------

def ids(table: pa.Table) -> list[int]:
    return [json.loads(m)["id"] for m in table.column("metadata").to_pylist()]


def test_eval_split_is_seeded_disjoint_and_capped(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", numbered(50))
    first = load_sft_data(config(source, eval_fraction=0.1), tokenizer, seed=1)
    again = load_sft_data(config(source, eval_fraction=0.1), tokenizer, seed=1)
    other = load_sft_data(config(source, eval_fraction=0.1), tokenizer, seed=2)
    assert len(ids(first.eval)) == 5 and ids(first.eval) == ids(again.eval) != ids(other.eval)
    assert sorted(ids(first.train) + ids(first.eval)) == list(range(50))
    assert ids(first.train) == sorted(ids(first.train))
    assert first.stats["eval_from"] == "train" and first.stats["eval_file"] is None
    assert (first.stats["train_rows"], first.stats["eval_rows"]) == (45, 5)

    capped = load_sft_data(config(source, eval_fraction=0.5, max_eval_samples=3), tokenizer, seed=1)
    assert (capped.train.num_rows, capped.eval.num_rows) == (47, 3)
    tiny = load_sft_data(config(write_jsonl(tmp_path / "two.jsonl", numbered(2)), eval_fraction=0.01),
                         tokenizer, seed=0)
    assert (tiny.train.num_rows, tiny.eval.num_rows) == (1, 1)


def test_eval_file_is_capped_and_no_eval_is_an_empty_table(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", numbered(4))
    evals = write_jsonl(tmp_path / "e.jsonl", numbered(10))
    data = load_sft_data(config(train, eval=evals, max_eval_samples=4, eval_fraction=0.5), tokenizer, seed=0)
    assert data.train.num_rows == 4 and len(ids(data.eval)) == 4
    assert ids(data.eval) == sorted(ids(data.eval)) and set(ids(data.eval)) <= set(range(10))
    none = load_sft_data(config(train), tokenizer, seed=0)
    assert none.eval.num_rows == 0 and none.eval.schema == SFT_SCHEMA and none.stats["eval_from"] == "none"
    json.dumps(none.stats)
