"""Reward-model data: pairwise preferences, ratings and rankings -> one Arrow table of tokenized candidates.

Three row formats, detected per file from the first readable row (or forced by `data.format`):

- pairwise: `{prompt, chosen, rejected, margin?}` with strings, or `{chosen: messages, rejected: messages}`,
  two whole conversations that differ only in their final assistant message;
- rating: `{prompt, response, score}`, score within `data.rating_scale`, normalised to [0, 1];
- ranking: `{prompt, responses: [...], ranking: [...]}`, ranking = indices into responses, best first.

`prompt` may also be a list of `{role, content}` messages. Every candidate is rendered exactly like an SFT
row, prompt messages + `{assistant: response}` through the tokenizer's chat template, so the reward model
reads what the policy writes. Other fields of a row (`task`, `input`, `id`) are kept as JSON metadata.

A row with any candidate longer than `data.max_length` is dropped and counted. There is no `overlong`
option here: a truncated response no longer shows the difference the preference is about.

With `data.ratings_to_pairs`, ratings of the same prompt become pair rows, higher score chosen, as in
Llama 2's reward data (Touvron et al., 2023, sec. 3.2.1), where graded answers to one prompt are compared.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

import pyarrow as pa
from jinja2 import TemplateError

from rlhf_ray.config import RewardDataConfig
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.loading import Record, collect_valid, read_records
from rlhf_ray.data.loading import detect_format as _detect_format
from rlhf_ray.data.sft import (
    ROLES,
    Message,
    cap_rows,
    encode,
    render,
    require_chat_template,
    split_eval,
)

PREFERENCE_SCHEMA = pa.schema([
    ("kind", pa.string()),                         # "pair" | "ranking" | "rating"
    ("sequences", pa.list_(pa.list_(pa.int32()))),  # [k][tokens]: prompt + each response, chat-rendered
    ("order", pa.list_(pa.int32())),                # [k] candidate indices, best first
    ("scores", pa.list_(pa.float32())),             # rating: [score normalised to [0, 1]]; else []
    ("margin", pa.float32()),                       # pair: the row's margin (default 0); else 0
    ("group", pa.int64()),                          # index of the prompt; rows of one prompt share it
    ("prompt_text", pa.string()),                   # rendered prompt with the generation prompt
    ("responses", pa.list_(pa.string())),           # [k] candidate texts
    ("metadata", pa.string()),                      # JSON of the row's other fields
])

FIELDS = {"pairwise": ("prompt", "chosen", "rejected", "margin"), "rating": ("prompt", "response", "score"),
          "ranking": ("prompt", "responses", "ranking")}


@dataclass(frozen=True)
class Feedback:
    """One parsed row before tokenizing: a prompt, its candidates, and the judgement on them."""

    kind: str
    prompt: tuple[Message, ...]
    responses: tuple[str, ...]
    order: tuple[int, ...]
    scores: tuple[float, ...] = ()
    margin: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferenceExample:
    """One row of the preference table (see PREFERENCE_SCHEMA); metadata is JSON-encoded in the table."""

    kind: str
    sequences: list[list[int]]
    order: list[int]
    scores: list[float]
    margin: float
    group: int
    prompt_text: str
    responses: list[str]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class PreferenceData:
    train: pa.Table
    eval: pa.Table
    stats: dict[str, Any]


def _missing(record: Record, name: str, fmt: str) -> DataError:
    need = ", ".join(f"'{f}'" for f in FIELDS[fmt] if f != "margin")
    return record.error(f"is missing; {fmt} rows need {need}", field=name)


def _string(record: Record, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise record.error("must be a string", field=name,
                           detail=f"got {'null' if value is None else type(value).__name__}")
    if not value.strip():
        raise record.error("must be a non-empty string", field=name)
    return value


def _text(record: Record, name: str, fmt: str) -> str:
    """A required non-blank string field."""
    value = record.value.get(name)
    if value is None:
        raise _missing(record, name, fmt)
    return _string(record, name, value)


def _number(record: Record, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise record.error("must be a finite number", field=name, detail=f"got {value!r:.40}")
    return float(value)


def _messages(record: Record, name: str, value: Any) -> tuple[Message, ...]:
    """A non-empty list of `{role, content}` messages with non-blank user/assistant content."""
    if not isinstance(value, list) or not value:
        raise record.error("must be a non-empty list of {role, content} objects", field=name,
                           detail=f"got {value!r:.40}")
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise record.error(f"must be an object with 'role' (one of {', '.join(ROLES)}) and string "
                               "'content'", field=where, detail=f"got {m!r:.60}")
        if m["role"] != "system" and not m["content"].strip():
            raise record.error(f"must be non-empty in a {m['role']} message", field=f"{where}.content")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _prompt(record: Record, fmt: str) -> tuple[Message, ...]:
    """`prompt` as messages: a string is one user turn; a message list is taken as given."""
    value = record.value.get("prompt")
    if isinstance(value, list):
        return _messages(record, "prompt", value)
    return ({"role": "user", "content": _text(record, "prompt", fmt)},)


def _metadata(record: Record, fmt: str) -> dict[str, Any]:
    return {k: v for k, v in record.value.items() if k not in FIELDS[fmt]}


def _conversation_pair(record: Record) -> tuple[tuple[Message, ...], str, str]:
    """(shared prompt, chosen reply, rejected reply) of `{chosen: messages, rejected: messages}`."""
    chosen = _messages(record, "chosen", record.value.get("chosen"))
    rejected = _messages(record, "rejected", record.value.get("rejected"))
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant" or len(conv) < 2:
            raise record.error("must be prompt messages followed by an assistant message (the response "
                               "judged)", field=name, detail=f"{len(conv)} messages, last {conv[-1]['role']!r}")
    if chosen[:-1] != rejected[:-1]:
        raise record.error("must share every message but the last with 'chosen' (the common prompt)",
                           field="rejected")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def parse_pairwise(record: Record, scale: tuple[float, float]) -> Feedback:
    """A pair: responses (chosen, rejected), order [0, 1], optional `margin`."""
    if isinstance(record.value.get("chosen"), list):
        prompt, chosen, rejected = _conversation_pair(record)
    else:
        prompt = _prompt(record, "pairwise")
        chosen, rejected = _text(record, "chosen", "pairwise"), _text(record, "rejected", "pairwise")
    if chosen.strip() == rejected.strip():
        raise record.error("must differ from 'chosen' (an identical pair states no preference)",
                           field="rejected")
    margin = record.value.get("margin")
    margin = 0.0 if margin is None else _number(record, "margin", margin)
    return Feedback("pair", prompt, (chosen, rejected), (0, 1), (), margin, _metadata(record, "pairwise"))


def parse_rating(record: Record, scale: tuple[float, float]) -> Feedback:
    """One rated response; its score, within `scale`, normalised to [0, 1]."""
    prompt, response = _prompt(record, "rating"), _text(record, "response", "rating")
    if record.value.get("score") is None:
        raise _missing(record, "score", "rating")
    score = _number(record, "score", record.value["score"])
    lo, hi = scale
    if not lo <= score <= hi:
        raise record.error(f"must be within the rating scale [{lo:g}, {hi:g}] (set data.rating_scale)",
                           field="score", detail=f"got {score:g}")
    return Feedback("rating", prompt, (response,), (0,), ((score - lo) / (hi - lo),), 0.0,
                    _metadata(record, "rating"))


def _ranking(record: Record, n: int) -> tuple[int, ...]:
    value = record.value.get("ranking")
    if value is None:
        raise _missing(record, "ranking", "ranking")
    ints = isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
    if not ints or sorted(value) != list(range(n)):
        raise record.error(f"must be a permutation of 0..{n - 1}: each index into 'responses' exactly once, "
                           "best first", field="ranking", detail=f"got {value!r:.60}")
    return tuple(value)


def parse_ranking(record: Record, scale: tuple[float, float]) -> Feedback:
    """k >= 2 distinct responses and their order, best first."""
    prompt = _prompt(record, "ranking")
    value = record.value.get("responses")
    if value is None:
        raise _missing(record, "responses", "ranking")
    if not isinstance(value, list) or len(value) < 2:
        raise record.error("must be a list of at least 2 responses", field="responses",
                           detail=f"got {value!r:.40}")
    responses = tuple(_string(record, f"responses[{i}]", r) for i, r in enumerate(value))
    stripped = [r.strip() for r in responses]
    for i, response in enumerate(stripped):
        if response in stripped[:i]:
            raise record.error(f"duplicates responses[{stripped.index(response)}]; a ranking compares "
                               "distinct responses", field=f"responses[{i}]")
    return Feedback("ranking", prompt, responses, _ranking(record, len(responses)), (), 0.0,
                    _metadata(record, "ranking"))


ROW_FORMATS: dict[str, Callable[[Record, tuple[float, float]], Feedback]] = {
    "pairwise": parse_pairwise, "rating": parse_rating, "ranking": parse_ranking,
}


def _guess_format(row: dict[str, Any]) -> str:
    if "ranking" in row or "responses" in row:
        return "ranking"
    if "score" in row or "response" in row:
        return "rating"
    return "pairwise"


def detect_format(fmt: str, records: Iterable[Record]) -> tuple[str, Iterator[Record]]:
    """`fmt`, or for "auto" the format of the first readable row; all records."""
    return _detect_format(fmt, records, _guess_format, "pairwise")


def candidate_ids(tokenizer: Any, prompt: Sequence[Message], response: str) -> list[int]:
    """What a reward model reads and scores (at its last token): prompt + `{assistant: response}`, rendered and
    tokenized. RLHF's reward actor calls this too, so the model scores policy samples as it was trained."""
    return encode(tokenizer, render(tokenizer, [*prompt, {"role": "assistant", "content": response}]))


def tokenize_feedback(tokenizer: Any, feedback: Feedback, record: Record) -> PreferenceExample:
    """Each candidate as prompt + `{assistant: response}` rendered and tokenized; group set later."""
    try:
        prompt_text = render(tokenizer, feedback.prompt, generation_prompt=True)
        sequences = [candidate_ids(tokenizer, feedback.prompt, r) for r in feedback.responses]
    except TemplateError as err:
        raise record.error("the chat template rejected this conversation", detail=str(err)) from err
    return PreferenceExample(feedback.kind, sequences, list(feedback.order), list(feedback.scores),
                             feedback.margin, -1, prompt_text, list(feedback.responses), feedback.metadata)


def assign_groups(examples: Sequence[PreferenceExample]) -> list[PreferenceExample]:
    """Number the distinct prompts (by rendered prompt text) in order of first appearance."""
    groups: dict[str, int] = {}
    return [replace(e, group=groups.setdefault(e.prompt_text, len(groups))) for e in examples]


def _pair_from(hi: PreferenceExample, lo: PreferenceExample) -> PreferenceExample:
    shared = {k: v for k, v in hi.metadata.items() if k in lo.metadata and lo.metadata[k] == v}
    return PreferenceExample("pair", [hi.sequences[0], lo.sequences[0]], [0, 1], [], 0.0, hi.group,
                             hi.prompt_text, [hi.responses[0], lo.responses[0]],
                             {**shared, "from_ratings": [hi.scores[0], lo.scores[0]]})


def ratings_to_pairs(examples: Sequence[PreferenceExample]) -> tuple[list[PreferenceExample], int, int]:
    """(rows with ratings replaced by pairs, pairs made, ties skipped): every two ratings of one group.

    Two ratings with equal scores, or of the same response, state no preference and are skipped. A pair
    keeps the metadata both ratings share, plus `from_ratings`: their normalised scores (chosen, rejected).
    """
    rows = [e for e in examples if e.kind != "rating"]
    by_group: defaultdict[int, list[PreferenceExample]] = defaultdict(list)
    for e in examples:
        if e.kind == "rating":
            by_group[e.group].append(e)
    made, ties = 0, 0
    for ratings in by_group.values():
        for a, b in combinations(ratings, 2):
            if a.scores[0] == b.scores[0] or a.responses == b.responses:
                ties += 1
                continue
            rows.append(_pair_from(a, b) if a.scores[0] > b.scores[0] else _pair_from(b, a))
            made += 1
    return rows, made, ties


def load_feedback(source: str, cfg: RewardDataConfig, tokenizer: Any) -> tuple[list[PreferenceExample],
                                                                                 dict[str, Any]]:
    """The tokenized rows of one source that fit `cfg.max_length`, with how many were read, skipped, dropped."""
    fmt, records = detect_format(cfg.format, read_records(source, cfg.split))
    parse, scale = ROW_FORMATS[fmt], (float(cfg.rating_scale[0]), float(cfg.rating_scale[1]))
    examples, skipped = collect_valid(records, lambda r: tokenize_feedback(tokenizer, parse(r, scale), r),
                                      cfg.skip_invalid, source=source)
    kept = assign_groups([e for e in examples if max(map(len, e.sequences)) <= cfg.max_length])
    if not kept:
        raise DataError(source, f"every row has a candidate longer than data.max_length={cfg.max_length} "
                                "tokens", detail="raise data.max_length")
    dropped = len(examples) - len(kept)
    made, ties = 0, 0
    if cfg.ratings_to_pairs:
        kept, made, ties = ratings_to_pairs(kept)
        if not kept:
            raise DataError(source, "data.ratings_to_pairs made no pairs: no prompt has two ratings with "
                                    "different scores", detail=f"{ties} ties skipped")
    stats = {"source": source, "format": fmt, "rows_read": len(examples) + sum(skipped.values()),
             "rows_kept": len(kept), "skipped": dict(skipped),
             "dropped": {"longer than max_length": dropped} if dropped else {},
             "kinds": dict(Counter(e.kind for e in kept)), "pairs_from_ratings": made,
             "rating_ties_skipped": ties}
    return kept, stats


def split_by_group(examples: Sequence[PreferenceExample], fraction: float, cap: int,
                   seed: int) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, eval): a seeded `fraction` of the prompts held out whole, eval capped at `cap` rows."""
    groups = sorted({e.group for e in examples})
    _, eval_idx = split_eval(len(groups), fraction, cap, seed)
    held = {groups[i] for i in eval_idx}
    train = [e for e in examples if e.group not in held]
    return train, cap_rows([e for e in examples if e.group in held], cap, seed)


def to_table(examples: Sequence[PreferenceExample]) -> pa.Table:
    columns = {name: [getattr(e, name) for e in examples] for name in PREFERENCE_SCHEMA.names}
    columns["metadata"] = [json.dumps(m, ensure_ascii=False, default=str) for m in columns["metadata"]]
    return pa.Table.from_pydict(columns, schema=PREFERENCE_SCHEMA)


def _set_stats(name: str, examples: Sequence[PreferenceExample]) -> dict[str, Any]:
    return {f"{name}_rows": len(examples), f"{name}_groups": len({e.group for e in examples}),
            f"{name}_sequences": sum(len(e.sequences) for e in examples),
            f"{name}_tokens": sum(len(s) for e in examples for s in e.sequences),
            f"{name}_kinds": dict(Counter(e.kind for e in examples))}


def load_preference_data(cfg: RewardDataConfig, tokenizer: Any, seed: int) -> PreferenceData:
    """Train and eval tables from `cfg.train` and `cfg.eval` (or a seeded `cfg.eval_fraction` of prompts).

    stats: `train_file`/`eval_file` (per source: format, rows read/kept, skipped by reason, dropped by
    reason, kinds, pairs_from_ratings, rating_ties_skipped; eval_file is None when eval is split off
    train), `eval_from` (file, train or none), and rows, groups, sequences, tokens and kinds of the final
    train and eval sets.
    """
    require_chat_template(tokenizer)
    train, train_stats = load_feedback(cfg.train, cfg, tokenizer)
    eval_stats = None
    if cfg.eval:
        held, eval_stats = load_feedback(cfg.eval, cfg, tokenizer)
        held = cap_rows(held, cfg.max_eval_samples, seed)
        eval_from = "file"
    else:
        train, held = split_by_group(train, cfg.eval_fraction, cfg.max_eval_samples, seed)
        eval_from = "train" if held else "none"
    stats = {"train_file": train_stats, "eval_file": eval_stats, "eval_from": eval_from,
             **_set_stats("train", train), **_set_stats("eval", held)}
    return PreferenceData(to_table(train), to_table(held), stats)
