"""Label items: a prompt and the candidate responses an annotator judges, under an id that survives restarts.

Sources (chosen by `LabelConfig`):
- a candidates file, rows `{prompt, responses: [...], models?: [...]}`; other fields (`task`, `input`) are
  carried into the reward-model rows;
- responses a model writes (`rlhf_ray.label.generate`), saved as such a file first;
- A/B: two answer files, rows `{prompt, response}` matched by prompt, or one candidates file whose `models`
  name both models.

An item's id is a hash of its prompt, responses and models, so a restarted server recognises what an annotator
has labeled whatever the order of the file. Repeated responses within a row are shown once.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.data.errors import DataError, location_word
from rlhf_ray.data.loading import Record, collect_valid, read_records
from rlhf_ray.label.config import LabelConfig

ROLES = ("system", "user", "assistant")
# Fields of the judgement log and the reward-model formats; a source row's other fields travel as metadata.
RESERVED_FIELDS = frozenset({
    "prompt", "chosen", "rejected", "margin", "response", "responses", "score", "scores", "ranking", "models",
    "annotator", "timestamp", "item_id", "mode", "verdict", "preferred", "shown", "extra"})


@dataclass(frozen=True)
class LabelItem:
    """One thing to judge. `models` (the model behind each response, when known) never reaches the page."""

    item_id: str
    prompt: Any
    """A string, or a list of {role, content} messages: as the reward-model formats take it."""
    responses: tuple[str, ...]
    models: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CandidateRow:
    """A parsed row of a candidates or answers file, with its location for error messages."""

    source: str
    index: int
    prompt: Any
    responses: tuple[str, ...]
    models: tuple[str, ...]
    extra: dict[str, Any]

    def error(self, message: str, field: Optional[str] = None, detail: Optional[str] = None) -> DataError:
        return DataError(self.source, message, row=self.index, field=field, detail=detail)


@dataclass(frozen=True)
class ItemSet:
    items: list[LabelItem]
    skipped: dict[str, int]
    """Rows not made into items, by reason (identical answers, duplicates, prompts only one A/B side has)."""


def make_item_id(prompt: Any, responses: Sequence[str], models: Sequence[str] = ()) -> str:
    """16 hex digits of the SHA-256 of the item's content."""
    text = json.dumps({"prompt": prompt, "responses": list(responses), "models": list(models)}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def display_order(item_id: str, annotator: str, seed: int, k: int) -> list[int]:
    """The candidate shown at each position: a shuffle fixed by (seed, item, annotator), so an answer the
    annotator returns to looks the same, and position bias averages out over items and annotators."""
    digest = hashlib.sha256(f"{seed}:{item_id}:{annotator}".encode("utf-8")).digest()
    order = list(range(k))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """The prompt as messages, for display."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_value(messages: Sequence[dict[str, str]]) -> Any:
    """The reward-model `prompt` of messages: the text of a lone user turn, else the message list."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _prompt(record: Record) -> Any:
    value = record.value.get("prompt")
    if isinstance(value, str) and value.strip():
        return value
    if not isinstance(value, list) or not value:
        raise record.error("must be a non-empty string or a list of {role, content} messages", field="prompt",
                           detail=f"got {value!r:.40}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise record.error(f"must be an object with 'role' (one of {', '.join(ROLES)}) and string 'content'",
                               field=f"prompt[{i}]", detail=f"got {m!r:.60}")
    return prompt_value(value)


def _strings(record: Record, name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise record.error("must be a non-empty list of strings", field=name, detail=f"got {value!r:.40}")
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            raise record.error("must be a non-empty string", field=f"{name}[{i}]", detail=f"got {text!r:.40}")
    return tuple(value)


def parse_candidates(record: Record) -> CandidateRow:
    """`{prompt, responses: [...], models?: [...]}`, or `{prompt, response}` (one answer, A/B side files)."""
    row = record.value
    prompt = _prompt(record)
    if "responses" in row or "response" not in row:
        responses = _strings(record, "responses", row.get("responses"))
    else:
        responses = _strings(record, "response", [row["response"]])
    models: tuple[str, ...] = ()
    if row.get("models") is not None:
        models = _strings(record, "models", row["models"])
        if len(models) != len(responses):
            raise record.error(f"must name one model per response ({len(responses)})", field="models",
                               detail=f"got {len(models)}")
    extra = {k: v for k, v in row.items() if k not in RESERVED_FIELDS}
    return CandidateRow(record.source, record.index, prompt, responses, models, extra)


def read_candidates(source: str) -> list[CandidateRow]:
    """Every row of a candidates file, validated; the first bad row stops with file, line and field."""
    rows, _ = collect_valid(read_records(source), parse_candidates, skip_invalid=False, source=source)
    return rows


def _distinct(row: CandidateRow) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Responses without repeats (compared stripped; the first kept), with their models."""
    first: dict[str, int] = {}
    for i, response in enumerate(row.responses):
        first.setdefault(response.strip(), i)
    keep = sorted(first.values())
    return tuple(row.responses[i] for i in keep), tuple(row.models[i] for i in keep) if row.models else ()


def _problem(mode: str, given: int, distinct: int) -> Optional[str]:
    """Why a row cannot be an item of `mode`, or None."""
    if mode == "pairwise" and given != 2:
        return f"pairwise mode compares exactly 2 responses, this row has {given} (use mode=ranking for more)"
    if mode == "pairwise" and distinct < 2:
        return "the two responses are the same: an identical pair states no preference"
    if mode == "ranking" and distinct < 2:
        return "a ranking needs at least 2 different responses"
    return None


def _unique(candidates: Iterable[LabelItem], skipped: Counter[str]) -> list[LabelItem]:
    """The first item of each id; repeats counted."""
    items: dict[str, LabelItem] = {}
    for item in candidates:
        if item.item_id in items:
            skipped["the same prompt and responses as an earlier item"] += 1
            continue
        items[item.item_id] = item
    return list(items.values())


def items_from_rows(rows: Sequence[CandidateRow], mode: str, strict: bool) -> ItemSet:
    """Items of `mode` (pairwise, rating, ranking) from candidate rows. With `strict` (a user's file) a row
    that cannot be one is an error naming it; otherwise (generated responses) it is skipped and counted."""
    skipped: Counter[str] = Counter()
    made = []
    for row in rows:
        responses, models = _distinct(row)
        problem = _problem(mode, len(row.responses), len(responses))
        if problem and strict:
            raise row.error(problem, field="responses")
        if problem:
            skipped[problem] += 1
            continue
        made.append(LabelItem(make_item_id(row.prompt, responses, models), row.prompt, responses, models,
                              row.extra))
    return ItemSet(_unique(made, skipped), dict(skipped))


def ab_pairs_from_candidates(rows: Sequence[CandidateRow], name_a: str, name_b: str) -> list[CandidateRow]:
    """Rows of one candidates file cut down to (A's response, B's response), found through `models`."""
    out = []
    for row in rows:
        if name_a not in row.models or name_b not in row.models:
            raise row.error(f"must name both ab.name_a={name_a!r} and ab.name_b={name_b!r}", field="models",
                            detail=f"got {list(row.models)}")
        a, b = row.responses[row.models.index(name_a)], row.responses[row.models.index(name_b)]
        out.append(CandidateRow(row.source, row.index, row.prompt, (a, b), (name_a, name_b), row.extra))
    return out


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _answers_by_prompt(rows: Sequence[CandidateRow], side: str) -> dict[str, CandidateRow]:
    found: dict[str, CandidateRow] = {}
    for row in rows:
        if len(row.responses) != 1:
            raise row.error(f"an answer file of side {side} gives one response per prompt",
                            field="responses", detail=f"got {len(row.responses)}")
        key = _prompt_key(row.prompt)
        if key in found:
            raise row.error(f"repeats the prompt of {location_word(row.source)} {found[key].index}: side {side} "
                            "must answer each prompt once", field="prompt")
        found[key] = row
    return found


def join_answers(rows_a: Sequence[CandidateRow], rows_b: Sequence[CandidateRow], name_a: str,
                 name_b: str) -> tuple[list[CandidateRow], Counter[str]]:
    """(prompt, A's answer, B's answer) for the prompts both sides answered, in A's order; the rest counted."""
    a, b = _answers_by_prompt(rows_a, "a"), _answers_by_prompt(rows_b, "b")
    joined = [CandidateRow(row.source, row.index, row.prompt, (row.responses[0], b[key].responses[0]),
                           (name_a, name_b), {**b[key].extra, **row.extra})
              for key, row in a.items() if key in b]
    skipped = Counter({f"prompt answered by {name_a} only": len(set(a) - set(b)),
                       f"prompt answered by {name_b} only": len(set(b) - set(a))})
    return joined, +skipped


def ab_items(pairs: Sequence[CandidateRow], skipped: Counter[str]) -> ItemSet:
    """A/B items (responses: A's, B's). Identical answers are not shown (nothing to judge) but counted."""
    made = []
    for row in pairs:
        if row.responses[0].strip() == row.responses[1].strip():
            skipped["identical answers of both models (not shown)"] += 1
            continue
        made.append(LabelItem(make_item_id(row.prompt, row.responses, row.models), row.prompt, row.responses,
                              row.models, row.extra))
    return ItemSet(_unique(made, skipped), dict(skipped))


def load_items(cfg: LabelConfig) -> ItemSet:
    """The items of `cfg`: from its files, generating responses first where it names models."""
    generated: dict[str, Path] = {}
    if cfg.model or cfg.ab.model_a or cfg.ab.model_b:
        # Not at the top: generate imports this module (a cycle), and loads Ray/torch only when it generates.
        from rlhf_ray.label.generate import ensure_generated

        generated = ensure_generated(cfg)
    if cfg.mode != "ab":
        source = str(generated.get("candidates") or cfg.candidates)
        found = items_from_rows(read_candidates(source), cfg.mode, strict=not generated)
    elif cfg.candidates:
        found = ab_items(ab_pairs_from_candidates(read_candidates(cfg.candidates), cfg.ab.name_a, cfg.ab.name_b),
                         Counter())
    else:
        side_a = str(generated.get("answers_a") or cfg.ab.candidates_a)
        side_b = str(generated.get("answers_b") or cfg.ab.candidates_b)
        pairs, skipped = join_answers(read_candidates(side_a), read_candidates(side_b), cfg.ab.name_a,
                                      cfg.ab.name_b)
        if not pairs:
            raise DataError(side_b, f"no prompt of {side_a} is answered here: A/B compares answers to the same "
                                    "prompts")
        found = ab_items(pairs, skipped)
    if not found.items:
        raise DataError(cfg.candidates or cfg.prompts or "candidates", "no item to label",
                        detail=", ".join(f"{reason}: {n}" for reason, n in found.skipped.items()))
    items = selection_order(found.items, cfg)
    return ItemSet(items[:cfg.max_items] if cfg.max_items else items, found.skipped)


def selection_order(items: list[LabelItem], cfg: LabelConfig) -> list[LabelItem]:
    """`items` in the order `cfg.select` asks for (before max_items keeps the first ones)."""
    if cfg.select == "random":
        shuffled = list(items)
        random.Random(cfg.seed).shuffle(shuffled)
        return shuffled
    if cfg.select == "uncertainty":
        # Deferred: scoring loads torch and transformers, which the other orders do not need.
        from rlhf_ray.label.select import order_by_uncertainty

        return order_by_uncertainty(items, cfg.select_models)
    return items
