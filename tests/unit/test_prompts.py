"""RLHF prompts: every accepted row form -> chat-rendered prompt ids and metadata, the length filter, and
errors that name the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlhf_ray.data.errors import DataError
from rlhf_ray.data.prompts import load_prompts
from rlhf_ray.rollout.schema import PROMPT_SCHEMA

USER = {"role": "user", "content": "reverse\nabc"}


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rendered(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load(tmp_path, tokenizer, rows, max_len: int = 256, **kw):
    return load_prompts(write_jsonl(tmp_path / "prompts.jsonl", rows), tokenizer, max_len, **kw)


def only_row(table) -> tuple[list[int], str, dict]:
    assert table.num_rows == 1
    row = table.to_pylist()[0]
    return row["prompt_ids"], row["prompt_text"], json.loads(row["metadata"])


def test_prompt_string(tmp_path, tiny_tokenizer):
    table, stats = load(tmp_path, tiny_tokenizer, [{"prompt": "reverse\nabc", "task": "reverse", "input": "abc"}])
    assert table.schema == PROMPT_SCHEMA
    ids, text, meta = only_row(table)
    assert text == rendered(tiny_tokenizer, [USER])
    assert text.endswith("<|assistant|>")  # the generation prompt
    assert ids == tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert meta == {"task": "reverse", "input": "abc"}
    assert stats["prompts"] == 1 and stats["rows_read"] == 1 and stats["dropped_too_long"] == 0


def test_prompt_messages(tmp_path, tiny_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, USER]
    table, _ = load(tmp_path, tiny_tokenizer, [{"prompt": messages, "id": 3}])
    _, text, meta = only_row(table)
    assert text == rendered(tiny_tokenizer, messages)
    assert meta == {"id": 3}


def test_prompt_with_output_keeps_it_as_the_reference(tmp_path, tiny_tokenizer):
    table, _ = load(tmp_path, tiny_tokenizer, [{"prompt": "reverse\nabc", "output": "cba"}])
    _, text, meta = only_row(table)
    assert text == rendered(tiny_tokenizer, [USER])
    assert meta == {"reference": "cba"}


def test_instruction_input_output(tmp_path, tiny_tokenizer):
    row = {"instruction": "reverse", "input": "abc", "output": "cba", "task": "reverse"}
    table, _ = load(tmp_path, tiny_tokenizer, [row, {"instruction": "say hi"}])
    rows = table.to_pylist()
    assert rows[0]["prompt_text"] == rendered(tiny_tokenizer, [USER])
    assert json.loads(rows[0]["metadata"]) == {"instruction": "reverse", "input": "abc", "task": "reverse",
                                               "reference": "cba"}
    assert rows[1]["prompt_text"] == rendered(tiny_tokenizer, [{"role": "user", "content": "say hi"}])
    assert "reference" not in json.loads(rows[1]["metadata"])


def test_messages_ending_with_the_assistant_give_the_reference(tmp_path, tiny_tokenizer):
    row = {"messages": [USER, {"role": "assistant", "content": "cba"}], "id": 1}
    _, text, meta = only_row(load(tmp_path, tiny_tokenizer, [row])[0])
    assert text == rendered(tiny_tokenizer, [USER])
    assert meta == {"id": 1, "reference": "cba"}


def test_messages_ending_with_the_user_are_all_prompt(tmp_path, tiny_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, USER]
    _, text, meta = only_row(load(tmp_path, tiny_tokenizer, [{"messages": messages}])[0])
    assert text == rendered(tiny_tokenizer, messages)
    assert meta == {}


def test_too_long_prompts_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    short = {"prompt": "ab"}
    long = {"prompt": "abcdefghij" * 3}
    limit = len(tiny_tokenizer(rendered(tiny_tokenizer, [{"role": "user", "content": "ab"}]),
                               add_special_tokens=False).input_ids)
    table, stats = load(tmp_path, tiny_tokenizer, [long, short, long], max_len=limit)
    assert table.num_rows == 1 and len(table.column("prompt_ids")[0]) == limit
    assert stats["dropped_too_long"] == 2 and stats["prompts"] == 1 and stats["rows_read"] == 3
    with pytest.raises(DataError, match="no prompt fits max_prompt_length=3"):
        load(tmp_path, tiny_tokenizer, [short], max_len=3)


def test_limit_keeps_the_first_rows(tmp_path, tiny_tokenizer):
    table, _ = load(tmp_path, tiny_tokenizer, [{"prompt": f"w{i}", "id": i} for i in range(5)], limit=2)
    assert [json.loads(m)["id"] for m in table.column("metadata").to_pylist()] == [0, 1]


# -- bad rows ----------------------------------------------------------------------------------------------

GOOD = {"prompt": "reverse\nabc"}
BAD_ROWS = [
    ({"text": "no prompt"}, "field 'prompt': needs a prompt"),
    ({"prompt": "  "}, "field 'prompt': must be a non-empty string"),
    ({"prompt": 7}, "field 'prompt': must be a non-empty string"),
    ({"prompt": [USER, {"role": "assistant", "content": "cba"}]},
     "field 'prompt': the prompt must not end with an assistant message"),
    ({"prompt": [{"role": "bot", "content": "x"}]}, "field 'prompt[0].role': must be one of"),
    ({"prompt": []}, "field 'prompt': must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]},
     "field 'messages[1].role': must be one of"),
    ({"messages": [{"role": "assistant", "content": "cba"}]}, "field 'messages': holds no prompt"),
    ({"messages": [USER, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "field 'messages': the prompt must not end with an assistant message"),
    ({"instruction": ""}, "field 'instruction': must be a non-empty string"),
    ({"instruction": "reverse", "input": 3}, "field 'input': must be a string"),
    ({"instruction": "reverse", "output": ["cba"]}, "field 'output': must be a string"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, tiny_tokenizer, bad, message):
    path = write_jsonl(tmp_path / "prompts.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as err:
        load_prompts(path, tiny_tokenizer, 256)
    assert str(err.value).startswith(f"{path}, line 3, {message}")


def test_skip_invalid_counts_bad_rows(tmp_path, tiny_tokenizer):
    rows = [GOOD, {"prompt": ""}, {"text": "x"}, {"prompt": ""}, {"prompt": "sort\nba"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    table, stats = load_prompts(str(path), tiny_tokenizer, 256, skip_invalid=True)
    assert table.num_rows == 2
    assert stats["rows_read"] == 6 and stats["prompts"] == 2
    assert stats["skipped"] == {"field 'prompt': must be a non-empty string": 2,
                                "field 'prompt': needs a prompt: one of the fields prompt, messages, or instruction": 1,
                                "not valid JSON": 1}


def test_nothing_valid_is_an_error_even_when_skipping(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no valid rows"):
        load(tmp_path, tiny_tokenizer, [{"prompt": ""}], skip_invalid=True)
