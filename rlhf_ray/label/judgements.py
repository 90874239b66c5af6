"""Judgements: what the page sends, checked against the item and the mode; the log record; its reward-model rows.

The page speaks in display positions (the shuffled order it showed, `items.display_order`); the log records
original candidate indices, so the page never learns which model wrote what. Bodies by mode:

- pairwise, ab: `{"choice": 0 | 1 | "tie" | "both_bad"}` (0: the response shown first);
- rating: `{"scores": [s, ...]}`, one score per shown response, each a value of the declared scale;
- ranking: `{"ranking": [p, ...]}`, every shown position once, best first.

A log record holds the item (prompt, responses, models), the annotator, a UTC timestamp and the judgement;
`rm_rows` turns it into rows of exactly the formats of `rlhf_ray.data.preference` (a preference is one pair, a
tie or "both bad" none, a rating one row per response, a ranking one row), plus `annotator`, `timestamp`,
`item_id` and the source row's extra fields, which the reward-model loader keeps as metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from rlhf_ray.label.items import LabelItem

CHOICES = ("tie", "both_bad")
FIELD_OF_MODE = {"pairwise": "choice", "ab": "choice", "rating": "scores", "ranking": "ranking"}
SCALE_TOLERANCE = 1e-6


class JudgementError(ValueError):
    """A judgement the server refuses; the message says what a valid one is."""


class JudgementBody(BaseModel):
    """The JSON body of a judgement (strict: no coercion of "1" to 1 or true to 1; no unknown fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    choice: Union[int, Literal["tie", "both_bad"], None] = None
    scores: Optional[list[float]] = None
    ranking: Optional[list[int]] = None


def describe_validation_error(err: ValidationError) -> str:
    """Pydantic's errors as one line: `scores.1: Input should be a valid number; ...`."""
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def parse_body(raw: bytes) -> JudgementBody:
    try:
        return JudgementBody.model_validate_json(raw)
    except ValidationError as err:
        raise JudgementError(f"malformed judgement: {describe_validation_error(err)}") from None


def on_scale(score: float, scale: Sequence[float]) -> bool:
    return any(abs(score - value) <= SCALE_TOLERANCE for value in scale)


def check_judgement(body: JudgementBody, mode: str, k: int, scale: Sequence[float]) -> dict[str, Any]:
    """The one field of `mode`, validated for an item of `k` responses (display terms)."""
    field = FIELD_OF_MODE[mode]
    given = [name for name in ("choice", "scores", "ranking") if getattr(body, name) is not None]
    if given != [field]:
        raise JudgementError(f"a {mode} judgement is {{\"{field}\": ...}}; got {', '.join(given) or 'no field'}")
    value = getattr(body, field)
    if field == "choice" and value not in CHOICES and value not in range(k):
        raise JudgementError(f"choice: must be 0 or 1 (the response shown first or second), \"tie\" or "
                             f"\"both_bad\"; got {value!r}")
    if field == "scores":
        if len(value) != k:
            raise JudgementError(f"scores: one score per response, {k}; got {len(value)}")
        for i, score in enumerate(value):
            if not on_scale(score, scale):
                raise JudgementError(f"scores[{i}]: {score:g} is not on the rating scale "
                                     f"({', '.join(f'{v:g}' for v in scale)})")
    if field == "ranking" and sorted(value) != list(range(k)):
        raise JudgementError(f"ranking: must list each of the {k} shown responses (0..{k - 1}) exactly once, "
                             f"best first; got {value}")
    return {field: value}


def now() -> str:
    """UTC time in ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def make_record(item: LabelItem, annotator: str, mode: str, judgement: dict[str, Any], order: Sequence[int],
                timestamp: Optional[str] = None) -> dict[str, Any]:
    """The log record of a judgement given in display terms (`order[j]`: the candidate shown at j)."""
    record: dict[str, Any] = {"item_id": item.item_id, "annotator": annotator, "timestamp": timestamp or now(),
                              "mode": mode, "prompt": item.prompt, "responses": list(item.responses),
                              "shown": list(order)}
    if item.models:
        record["models"] = list(item.models)
    if item.extra:
        record["extra"] = item.extra
    if "choice" in judgement:
        choice = judgement["choice"]
        if choice in CHOICES:
            record.update(verdict=choice, preferred=None)
        else:
            best = order[choice]
            record.update(verdict="preferred", preferred=best, chosen=item.responses[best],
                          rejected=item.responses[1 - best])
    elif "scores" in judgement:
        scores = [0.0] * len(order)
        for position, score in enumerate(judgement["scores"]):
            scores[order[position]] = float(score)
        record["scores"] = scores
    else:
        record["ranking"] = [order[position] for position in judgement["ranking"]]
    return record


def rm_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The reward-model rows of a log record (none for a tie or "both bad")."""
    meta = {"annotator": record["annotator"], "timestamp": record["timestamp"], "item_id": record["item_id"],
            **record.get("extra", {})}
    prompt = record["prompt"]
    if record["mode"] in ("pairwise", "ab"):
        if record["verdict"] != "preferred":
            return []
        return [{"prompt": prompt, "chosen": record["chosen"], "rejected": record["rejected"], **meta}]
    if record["mode"] == "rating":
        return [{"prompt": prompt, "response": r, "score": s, **meta}
                for r, s in zip(record["responses"], record["scores"])]
    return [{"prompt": prompt, "responses": record["responses"], "ranking": record["ranking"], **meta}]


def shown_judgement(record: Optional[dict[str, Any]], order: Sequence[int]) -> Optional[dict[str, Any]]:
    """A logged judgement in the display terms of `order` (to show the annotator their earlier answer)."""
    if record is None:
        return None
    position = {candidate: j for j, candidate in enumerate(order)}
    if record["mode"] in ("pairwise", "ab"):
        preferred = record["preferred"]
        return {"choice": record["verdict"] if preferred is None else position[preferred]}
    if record["mode"] == "rating":
        return {"scores": [record["scores"][candidate] for candidate in order]}
    return {"ranking": [position[candidate] for candidate in record["ranking"]]}


def ab_outcome(record: dict[str, Any]) -> str:
    """"a", "b" (the winning model's side), "tie" or "both_bad" of an A/B record (responses: A's, B's)."""
    return record["verdict"] if record["preferred"] is None else "ab"[record["preferred"]]
