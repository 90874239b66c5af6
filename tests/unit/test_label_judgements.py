"""Judgements: strict parsing, validation against mode and item, display <-> original indices, and reward-model
rows that the reward-model stage's own parsers accept."""

from __future__ import annotations

import pytest

from rlhf_ray.data.loading import Record
from rlhf_ray.data.preference import ROW_FORMATS, _guess_format
from rlhf_ray.label.items import LabelItem
from rlhf_ray.label.judgements import (
    JudgementError,
    check_judgement,
    make_record,
    parse_body,
    rm_rows,
    shown_judgement,
)

SCALE = (1.0, 2.0, 3.0, 4.0, 5.0)
PAIR = LabelItem("id-pair", "sort\ncab", ("abc", "acb"), extra={"task": "sort"})
FOUR = LabelItem("id-four", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                             {"role": "user", "content": "again"}], ("w", "x", "y", "z"))


def check(mode: str, body: str, k: int = 2):
    return check_judgement(parse_body(body.encode()), mode, k, SCALE)


@pytest.mark.parametrize("body, message", [
    ("{oops", "Invalid JSON"),
    ("[1]", "body: Input should be an object"),
    ('{"choice": "1"}', "choice"),          # strict: no coercion of strings
    ('{"choice": true}', "choice"),         # nor of booleans
    ('{"choice": 0, "why": "x"}', "why: Extra inputs are not permitted"),
    ('{"scores": ["5"]}', "scores.0"),
    ('{"ranking": [0.5, 1]}', "ranking.0"),
])
def test_malformed_bodies_are_refused_with_the_field(body, message):
    with pytest.raises(JudgementError, match="malformed judgement") as err:
        parse_body(body.encode())
    assert message in str(err.value)


def test_valid_judgements_of_each_mode():
    assert check("pairwise", '{"choice": 1}') == {"choice": 1}
    assert check("ab", '{"choice": "both_bad"}') == {"choice": "both_bad"}
    assert check("pairwise", '{"choice": "tie"}') == {"choice": "tie"}
    assert check("rating", '{"scores": [1, 5.0, 3]}', k=3) == {"scores": [1.0, 5.0, 3.0]}
    assert check("ranking", '{"ranking": [2, 0, 1]}', k=3) == {"ranking": [2, 0, 1]}


@pytest.mark.parametrize("mode, body, k, message", [
    ("pairwise", '{"choice": 2}', 2, "must be 0 or 1"),
    ("pairwise", '{"choice": -1}', 2, "must be 0 or 1"),
    ("pairwise", '{"scores": [1, 2]}', 2, 'a pairwise judgement is {"choice": ...}; got scores'),
    ("pairwise", '{}', 2, "got no field"),
    ("ab", '{"choice": 0, "ranking": [0, 1]}', 2, "got choice, ranking"),
    ("rating", '{"scores": [1, 6]}', 2, r"scores\[1\]: 6 is not on the rating scale \(1, 2, 3, 4, 5\)"),
    ("rating", '{"scores": [1, 2.5]}', 2, "2.5 is not on the rating scale"),
    ("rating", '{"scores": [1]}', 2, "one score per response, 2; got 1"),
    ("ranking", '{"ranking": [0, 0, 1]}', 3, r"each of the 3 shown responses \(0..2\) exactly once"),
    ("ranking", '{"ranking": [0, 1]}', 3, "exactly once"),
    ("ranking", '{"ranking": [0, 1, 3]}', 3, "exactly once"),
])
def test_invalid_judgements_say_what_is_valid(mode, body, k, message):
    with pytest.raises(JudgementError, match=message):
        check(mode, body, k)


def test_a_pairwise_preference_is_recorded_by_original_index():
    order = [1, 0]  # shown first: candidate 1 ("acb")
    record = make_record(PAIR, "alice", "pairwise", {"choice": 0}, order, timestamp="T")
    assert record["preferred"] == 1 and record["chosen"] == "acb" and record["rejected"] == "abc"
    assert record["verdict"] == "preferred" and record["shown"] == [1, 0]
    assert rm_rows(record) == [{"prompt": "sort\ncab", "chosen": "acb", "rejected": "abc", "annotator": "alice",
                                "timestamp": "T", "item_id": "id-pair", "task": "sort"}]
    assert shown_judgement(record, order) == {"choice": 0}
    assert shown_judgement(record, [0, 1]) == {"choice": 1}  # shown in another order: same response


@pytest.mark.parametrize("choice", ["tie", "both_bad"])
def test_ties_and_both_bad_are_logged_but_are_no_reward_model_pair(choice):
    record = make_record(PAIR, "alice", "ab", {"choice": choice}, [0, 1])
    assert record["verdict"] == choice and record["preferred"] is None and "chosen" not in record
    assert rm_rows(record) == []
    assert shown_judgement(record, [1, 0]) == {"choice": choice}


def test_ratings_and_rankings_map_display_positions_to_candidates():
    order = [2, 0, 3, 1]  # position j shows candidate order[j]
    rating = make_record(FOUR, "bob", "rating", {"scores": [5, 1, 2, 4]}, order, timestamp="T")
    assert rating["scores"] == [1.0, 4.0, 5.0, 2.0]  # candidate 2 ("y") was shown first and got 5
    assert [(r["response"], r["score"]) for r in rm_rows(rating)] == [("w", 1.0), ("x", 4.0), ("y", 5.0), ("z", 2.0)]
    assert shown_judgement(rating, order) == {"scores": [5.0, 1.0, 2.0, 4.0]}
    ranking = make_record(FOUR, "bob", "ranking", {"ranking": [1, 3, 0, 2]}, order, timestamp="T")
    assert ranking["ranking"] == [0, 1, 2, 3]  # positions 1, 3, 0, 2 show candidates 0, 1, 2, 3
    assert rm_rows(ranking) == [{"prompt": FOUR.prompt, "responses": ["w", "x", "y", "z"], "ranking": [0, 1, 2, 3],
                                 "annotator": "bob", "timestamp": "T", "item_id": "id-four"}]
    assert shown_judgement(ranking, order) == {"ranking": [1, 3, 0, 2]}


def test_reward_model_rows_are_what_the_reward_model_stage_parses():
    records = [make_record(PAIR, "a", "pairwise", {"choice": 1}, [0, 1]),
               make_record(FOUR, "a", "rating", {"scores": [1, 2, 3, 4]}, [0, 1, 2, 3]),
               make_record(FOUR, "a", "ranking", {"ranking": [3, 2, 1, 0]}, [0, 1, 2, 3])]
    for record, fmt, kind in zip(records, ("pairwise", "rating", "ranking"), ("pair", "rating", "ranking")):
        for i, row in enumerate(rm_rows(record)):
            assert _guess_format(row) == fmt  # detected as the right format from the row alone
            feedback = ROW_FORMATS[fmt](Record("feedback.jsonl", i + 1, "line", row), (1.0, 5.0))
            assert feedback.kind == kind
            assert feedback.metadata["annotator"] == "a" and feedback.metadata["item_id"] == record["item_id"]
    assert ROW_FORMATS["ranking"](Record("f", 1, "line", rm_rows(records[2])[0]), (1.0, 5.0)).order == (3, 2, 1, 0)
