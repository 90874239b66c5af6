"""RLHF prompts: rows of a file or dataset -> chat-rendered prompt token ids (`PROMPT_SCHEMA`).

Accepted rows (detected per row):
- `{prompt: "text", output?}` or `{prompt: [{role, content}, ...], output?}`;
- `{instruction, input?, output?}` (the SFT format);
- `{messages: [...]}`: a trailing assistant message is taken as the reference, the rest is the prompt.
An `output` field, when present, is kept as the `reference` (what `rewards.tasks:exact_match` compares with).
Every other field (`task`, `input`, `id`) is kept in the JSON metadata that reward functions receive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

from rlhf_ray.data.errors import DataError
from rlhf_ray.data.loading import Record, collect_valid, read_records
from rlhf_ray.data.sft import Message, _message, encode, render, require_chat_template
from rlhf_ray.rollout.schema import PROMPT_SCHEMA


@dataclass(frozen=True)
class PromptRow:
    messages: tuple[Message, ...]
    metadata: dict[str, Any]


def _string(record: Record, name: str, required: bool) -> Optional[str]:
    value = record.value.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise record.error("must be a non-empty string" if required else "must be a string", field=name,
                           detail=f"got {value!r:.40}")
    return value


def _messages(record: Record, value: Any, field: str) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise record.error("must be a non-empty list of {role, content} objects", field=field)
    try:
        return tuple(_message(record, i, m) for i, m in enumerate(value))
    except DataError as err:  # re-label messages[i] as <field>[i]
        raise record.error(err.message, field=(err.field or "").replace("messages", field, 1),
                           detail=err.detail) from None


def parse_prompt(record: Record) -> PromptRow:
    """One prompt row in any accepted form; the reference answer (if any) goes to metadata."""
    row = record.value
    meta = {k: v for k, v in row.items() if k not in ("prompt", "messages", "output")}
    if "prompt" in row:
        field = "prompt"
        prompt = row["prompt"]
        messages = ({"role": "user", "content": _string(record, "prompt", True)},) if not isinstance(
            prompt, list) else _messages(record, prompt, "prompt")
    elif "messages" in row:
        field = "messages"
        messages = _messages(record, row["messages"], "messages")
        if messages[-1]["role"] == "assistant":
            meta["reference"] = messages[-1]["content"]
            messages = messages[:-1]
        if not messages:
            raise record.error("holds no prompt before the assistant message", field="messages")
    elif "instruction" in row:
        field = "instruction"
        instruction = _string(record, "instruction", True)
        task_input = _string(record, "input", False) or ""
        messages = ({"role": "user", "content": f"{instruction}\n{task_input}" if task_input else instruction},)
    else:
        raise record.error("needs a prompt: one of the fields prompt, messages, or instruction", field="prompt")
    if field != "messages":
        output = _string(record, "output", False)
        if output is not None:
            meta["reference"] = output
    if messages[-1]["role"] == "assistant":
        raise record.error("the prompt must not end with an assistant message", field=field)
    return PromptRow(messages, meta)


def load_prompts(source: str, tokenizer: Any, max_prompt_length: int, skip_invalid: bool = False,
                 split: str = "train", limit: Optional[int] = None) -> tuple[pa.Table, dict[str, Any]]:
    """Prompt table (`PROMPT_SCHEMA`) from `source`; prompts longer than `max_prompt_length` are dropped."""
    require_chat_template(tokenizer)
    rows, skipped = collect_valid(read_records(source, split), parse_prompt, skip_invalid, source=source)
    ids, texts, metas, messages, too_long = [], [], [], [], 0
    for row in rows[:limit] if limit else rows:
        text = render(tokenizer, row.messages, generation_prompt=True)
        prompt_ids = encode(tokenizer, text)
        if len(prompt_ids) > max_prompt_length:
            too_long += 1
            continue
        ids.append(prompt_ids)
        texts.append(text)
        metas.append(json.dumps(row.metadata, ensure_ascii=False))
        messages.append(list(row.messages))
    if not ids:
        raise DataError(source, f"no prompt fits max_prompt_length={max_prompt_length} tokens")
    table = pa.Table.from_pydict({"prompt_ids": ids, "prompt_text": texts, "metadata": metas,
                                  "prompt_messages": messages}, schema=PROMPT_SCHEMA)
    stats = {"source": source, "rows_read": len(rows) + sum(skipped.values()), "skipped": dict(skipped),
             "dropped_too_long": too_long, "prompts": len(ids)}
    return table, stats
