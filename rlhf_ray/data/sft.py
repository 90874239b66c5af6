"""SFT data: rows of a file or dataset -> token ids with the loss on the assistant's tokens only.

Two row formats: instruction rows `{instruction, input?, output}` become a user turn and an assistant turn;
messages rows `{messages: [{role, content}, ...]}` are a whole conversation ending with the assistant. Any
other field of a row (`task`, `id`) is kept as JSON metadata.

The conversation is rendered with the tokenizer's own chat template. The response tokens of assistant turn
i are those that the render of messages[:i+1] adds to the render of messages[:i] with the generation
prompt, which needs the template to be prefix-consistent (earlier turns render the same whatever follows):
the approach of TRL's `assistant_only_loss` without needing `{% generation %}` markers in the template.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
from jinja2 import TemplateError

from rlhf_ray.config import DataConfig
from rlhf_ray.data.errors import ChatTemplateError, DataError
from rlhf_ray.data.loading import Record, collect_valid, read_records
from rlhf_ray.data.loading import detect_format as _detect_format

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
INSTRUCTION_FIELDS = ("instruction", "input", "output")

SFT_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("prompt_ids", pa.list_(pa.int32())),
    ("prompt_text", pa.string()),
    ("reference", pa.string()),
    ("metadata", pa.string()),
])


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SFTExample:
    """One tokenized conversation; a row of the SFT table (see SFT_SCHEMA)."""

    input_ids: list[int]
    loss_mask: list[int]
    """1 on the response tokens of every assistant turn (including its end-of-turn token), else 0."""
    prompt_ids: list[int]
    """The conversation up to and including the generation prompt of the last assistant turn."""
    prompt_text: str
    reference: str
    """The last assistant message: what the model should answer to prompt_ids."""
    metadata: str


@dataclass(frozen=True)
class SFTData:
    train: pa.Table
    eval: pa.Table
    stats: dict[str, Any]


def _text(record: Record, name: str, required: bool) -> str:
    """A string field; a required one must be non-blank, an optional one may be missing or null."""
    value = record.value.get(name)
    if value is None:
        if required:
            raise record.error("is missing; instruction rows need non-empty 'instruction' and 'output'",
                               field=name)
        return ""
    if not isinstance(value, str):
        raise record.error("must be a string", field=name, detail=f"got {type(value).__name__}")
    if required and not value.strip():
        raise record.error("must be a non-empty string", field=name)
    return value


def parse_instruction(record: Record) -> Conversation:
    """`{instruction, input?, output, ...}` -> [user, assistant]; user = instruction + "\\n" + input."""
    instruction = _text(record, "instruction", required=True)
    task_input = _text(record, "input", required=False)
    output = _text(record, "output", required=True)
    user = f"{instruction}\n{task_input}" if task_input else instruction
    # `instruction` and `input` stay in the metadata too: task checkers and reward functions grade the
    # answer against them (e.g. the synthetic tasks' checker re-solves `input`).
    metadata = {k: v for k, v in record.value.items() if k != "output"}
    messages = ({"role": "user", "content": user}, {"role": "assistant", "content": output})
    return Conversation(messages, metadata)


def _message(record: Record, i: int, value: Any) -> Message:
    field = f"messages[{i}]"
    if not isinstance(value, dict):
        raise record.error("must be an object with 'role' and 'content'", field=field,
                           detail=f"got {type(value).__name__}")
    role, content = value.get("role"), value.get("content")
    if not isinstance(role, str) or role not in ROLES:
        raise record.error(f"must be one of {', '.join(ROLES)}", field=f"{field}.role",
                           detail=f"got {role!r}")
    if not isinstance(content, str):
        raise record.error("must be a string", field=f"{field}.content",
                           detail=f"got {'null' if content is None else type(content).__name__}")
    if role != "system" and not content.strip():
        raise record.error(f"must be non-empty in a {role} message", field=f"{field}.content")
    return {"role": role, "content": content}


def parse_messages(record: Record) -> Conversation:
    """`{messages: [{role, content}, ...], ...}`: a non-empty conversation that ends with the assistant."""
    messages = record.value.get("messages")
    if messages is None:
        raise record.error("is missing; messages rows need a list of {role, content} objects",
                           field="messages")
    if not isinstance(messages, list) or not messages:
        raise record.error("must be a non-empty list of {role, content} objects", field="messages",
                           detail=f"got {messages!r:.40}")
    parsed = tuple(_message(record, i, m) for i, m in enumerate(messages))
    if parsed[-1]["role"] != "assistant":
        raise record.error("the last message must be the assistant's (the response to learn)",
                           field=f"messages[{len(parsed) - 1}].role", detail=f"got {parsed[-1]['role']!r}")
    metadata = {k: v for k, v in record.value.items() if k != "messages"}
    return Conversation(parsed, metadata)


ROW_FORMATS: dict[str, Callable[[Record], Conversation]] = {
    "instruction": parse_instruction, "messages": parse_messages,
}


def detect_format(fmt: str, records: Iterable[Record]) -> tuple[str, Iterator[Record]]:
    """`fmt`, or for "auto" the format of the first readable row (has `messages` -> messages); all records."""
    return _detect_format(fmt, records, lambda row: "messages" if "messages" in row else "instruction",
                          "instruction")


def require_chat_template(tokenizer: Any) -> None:
    """Raise ChatTemplateError unless the tokenizer can render conversations."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(getattr(tokenizer, "name_or_path", "") or "tokenizer",
                                "the tokenizer has no chat template; set model.tokenizer to a chat or "
                                "instruct model's tokenizer, or give the tokenizer a chat_template")


def render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    """The chat-template text of `messages`, optionally followed by the assistant's generation prompt."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=generation_prompt)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text; the template already holds any special tokens (BOS) it wants."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def format_prompt(tokenizer: Any, user_text: str) -> str:
    """A single-turn prompt ready for generation: the user turn and the assistant's generation prompt."""
    require_chat_template(tokenizer)
    return render(tokenizer, [{"role": "user", "content": user_text}], generation_prompt=True)


def _not_prefix(record: Record, turn: int, shorter: str, longer: str) -> ChatTemplateError:
    return ChatTemplateError(
        record.source,
        f"the chat template is not prefix-consistent: the tokens of {shorter} are not a prefix of those of "
        f"{longer}, so the response tokens of assistant message {turn} cannot be located for the loss mask; "
        "use a template that renders earlier turns the same whatever follows them", row=record.index)


def tokenize_conversation(tokenizer: Any, conversation: Conversation, record: Record) -> SFTExample:
    """Token ids of the whole conversation, with loss_mask 1 exactly on what each assistant turn adds."""
    messages = conversation.messages
    try:
        input_ids = encode(tokenizer, render(tokenizer, messages))
        loss_mask = [0] * len(input_ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt_text = render(tokenizer, messages[:i], generation_prompt=True)
            prompt_ids = encode(tokenizer, prompt_text)
            last = i == len(messages) - 1
            turn_ids = input_ids if last else encode(tokenizer, render(tokenizer, messages[:i + 1]))
            if turn_ids[:len(prompt_ids)] != prompt_ids:
                raise _not_prefix(record, i, f"messages[:{i}] + generation prompt", f"messages[:{i + 1}]")
            if input_ids[:len(turn_ids)] != turn_ids:
                raise _not_prefix(record, i, f"messages[:{i + 1}]", "the whole conversation")
            loss_mask[len(prompt_ids):len(turn_ids)] = [1] * (len(turn_ids) - len(prompt_ids))
    except TemplateError as err:
        raise record.error("the chat template rejected this conversation", detail=str(err)) from err
    return SFTExample(input_ids, loss_mask, prompt_ids, prompt_text, messages[-1]["content"],
                      json.dumps(conversation.metadata, ensure_ascii=False, default=str))


def fit_length(examples: Iterable[SFTExample], max_length: int,
               overlong: str) -> tuple[list[SFTExample], int, Counter[str]]:
    """(kept examples, number truncated, dropped by reason) for `data.overlong` = truncate or drop."""
    kept: list[SFTExample] = []
    truncated, dropped = 0, Counter[str]()
    for example in examples:
        if len(example.input_ids) <= max_length:
            kept.append(example)
        elif overlong == "drop":
            dropped["longer than max_length"] += 1
        elif not any(example.loss_mask[:max_length]):
            dropped["prompt longer than max_length"] += 1
        else:
            truncated += 1
            kept.append(replace(example, input_ids=example.input_ids[:max_length],
                                loss_mask=example.loss_mask[:max_length]))
    return kept, truncated, dropped


def load_examples(source: str, cfg: DataConfig, tokenizer: Any) -> tuple[list[SFTExample], dict[str, Any]]:
    """The tokenized rows of one source that fit `cfg.max_length`, and how many were read, skipped, cut."""
    fmt, records = detect_format(cfg.format, read_records(source, cfg.split))
    parse = ROW_FORMATS[fmt]
    examples, skipped = collect_valid(records, lambda r: tokenize_conversation(tokenizer, parse(r), r),
                                      cfg.skip_invalid, source=source)
    kept, truncated, dropped = fit_length(examples, cfg.max_length, cfg.overlong)
    if not kept:
        raise DataError(source, f"every row is longer than data.max_length={cfg.max_length} tokens",
                        detail="raise data.max_length or set data.overlong=truncate")
    stats = {"source": source, "format": fmt, "rows_read": len(examples) + sum(skipped.values()),
             "rows_kept": len(kept), "skipped": dict(skipped), "truncated": truncated,
             "dropped": dict(dropped)}
    return kept, stats


def split_eval(n: int, fraction: float, cap: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices, each in original order: a seeded random `fraction` of n held out.

    At least one row is held out when fraction > 0 and n >= 2, at most `cap`, and at least one stays in train.
    """
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(max(1, round(n * fraction)), cap, n - 1)
    held = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def cap_rows(examples: list[SFTExample], cap: int, seed: int) -> list[SFTExample]:
    """At most `cap` examples: a seeded random subset in original order."""
    if len(examples) <= cap:
        return examples
    chosen = np.random.default_rng(seed).choice(len(examples), size=cap, replace=False)
    return [examples[i] for i in sorted(chosen.tolist())]


def to_table(examples: Sequence[SFTExample]) -> pa.Table:
    columns = {name: [getattr(e, name) for e in examples] for name in SFT_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=SFT_SCHEMA)


def _token_stats(name: str, examples: Sequence[SFTExample]) -> dict[str, int]:
    return {f"{name}_rows": len(examples), f"{name}_tokens": sum(len(e.input_ids) for e in examples),
            f"{name}_response_tokens": sum(sum(e.loss_mask) for e in examples)}


def load_sft_data(cfg: DataConfig, tokenizer: Any, seed: int) -> SFTData:
    """Train and eval tables from `cfg.train` and `cfg.eval` (or a seeded `cfg.eval_fraction` of train).

    stats: `train_file`/`eval_file` (per source: rows read/kept, skipped by reason, truncated, dropped by
    reason; eval_file is None when eval is split off train), `eval_from` (file, train or none), and rows,
    tokens and response tokens of the final train and eval sets.
    """
    require_chat_template(tokenizer)
    train, train_stats = load_examples(cfg.train, cfg, tokenizer)
    eval_stats = None
    if cfg.eval:
        held, eval_stats = load_examples(cfg.eval, cfg, tokenizer)
        held = cap_rows(held, cfg.max_eval_samples, seed)
        eval_from = "file"
    else:
        train_idx, eval_idx = split_eval(len(train), cfg.eval_fraction, cfg.max_eval_samples, seed)
        held, train = [train[i] for i in eval_idx], [train[i] for i in train_idx]
        eval_from = "train" if held else "none"
    stats = {"train_file": train_stats, "eval_file": eval_stats, "eval_from": eval_from,
             **_token_stats("train", train), **_token_stats("eval", held)}
    return SFTData(to_table(train), to_table(held), stats)
