"""Label items from candidate files: validation with located errors, stable ids, shuffling, A/B joins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.label.config import LabelConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.data.errors import DataError
from rlhf_ray.label.items import (
    ab_items,
    ab_pairs_from_candidates,
    display_order,
    items_from_rows,
    join_answers,
    load_items,
    make_item_id,
    read_candidates,
)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_candidates_become_items_with_their_extra_fields(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "sort\ncab", "responses": ["abc", "acb"], "task": "sort", "input": "cab", "score": 3},
        {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
         "responses": ["hello", "hey"], "models": ["m1", "m2"]},
    ])
    found = items_from_rows(read_candidates(source), "pairwise", strict=True)
    first, second = found.items
    assert first.prompt == "sort\ncab" and first.responses == ("abc", "acb") and first.models == ()
    assert first.extra == {"task": "sort", "input": "cab"}  # "score" is a reward-model field, not metadata
    assert second.prompt == [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    assert second.models == ("m1", "m2")
    # A lone user message is the plain-string prompt of the reward-model formats.
    lone = write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "responses": ["a", "b"]}])
    assert items_from_rows(read_candidates(lone), "pairwise", strict=True).items[0].prompt == "hi"


@pytest.mark.parametrize("row, field, message", [
    ({"responses": ["a", "b"]}, "prompt", "non-empty string or a list"),
    ({"prompt": "  ", "responses": ["a", "b"]}, "prompt", "non-empty string"),
    ({"prompt": [{"role": "robot", "content": "x"}], "responses": ["a", "b"]}, "prompt[0]", "'role'"),
    ({"prompt": "p", "responses": "ab"}, "responses", "non-empty list of strings"),
    ({"prompt": "p", "responses": []}, "responses", "non-empty list of strings"),
    ({"prompt": "p", "responses": ["a", " "]}, "responses[1]", "non-empty string"),
    ({"prompt": "p", "responses": ["a", 3]}, "responses[1]", "non-empty string"),
    ({"prompt": "p", "responses": ["a", "b"], "models": ["m"]}, "models", "one model per response"),
])
def test_a_bad_candidate_row_names_file_line_and_field(tmp_path, row, field, message):
    source = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "ok", "responses": ["x", "y"]}, row])
    with pytest.raises(DataError) as err:
        read_candidates(source)
    assert f"{source}, line 2, field '{field}'" in str(err.value) and message in str(err.value)


def test_unparseable_line_and_missing_file_are_located(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{oops\n')
    with pytest.raises(DataError, match=r"c\.jsonl, line 2: not valid JSON"):
        read_candidates(str(bad))
    with pytest.raises(DataError, match="file not found"):
        read_candidates(str(tmp_path / "missing.jsonl"))


def test_pairwise_needs_two_different_responses(tmp_path):
    three = write_jsonl(tmp_path / "three.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    with pytest.raises(DataError, match=r"line 1, field 'responses': pairwise mode compares exactly 2.*ranking"):
        items_from_rows(read_candidates(three), "pairwise", strict=True)
    same = read_candidates(write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "responses": ["a", "a "]},
                                                                  {"prompt": "q", "responses": ["a", "b"]}]))
    with pytest.raises(DataError, match="identical pair states no preference"):
        items_from_rows(same, "pairwise", strict=True)
    # Generated responses (not strict): skipped and counted instead.
    found = items_from_rows(same, "pairwise", strict=False)
    assert [i.prompt for i in found.items] == ["q"] and sum(found.skipped.values()) == 1


def test_repeated_responses_are_shown_once_and_repeated_items_once(tmp_path):
    rows = read_candidates(write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "a", "c"], "models": ["x", "y", "z", "w"]},
        {"prompt": "p", "responses": ["a", "b", "a", "c"], "models": ["x", "y", "z", "w"]},
        {"prompt": "q", "responses": ["a", "a"]},
    ]))
    found = items_from_rows(rows, "ranking", strict=False)
    assert len(found.items) == 1
    assert found.items[0].responses == ("a", "b", "c") and found.items[0].models == ("x", "y", "w")
    assert found.skipped == {"the same prompt and responses as an earlier item": 1,
                             "a ranking needs at least 2 different responses": 1}
    # Rating takes any number of responses, one included.
    assert len(items_from_rows(rows, "rating", strict=True).items) == 2


def test_item_ids_depend_on_content_only():
    a = make_item_id("p", ["x", "y"])
    assert a == make_item_id("p", ("x", "y")) and len(a) == 16
    others = [make_item_id("p", ["y", "x"]), make_item_id("q", ["x", "y"]), make_item_id("p", ["x", "y"], ["m", "n"])]
    assert len({a, *others}) == 4


def test_display_order_is_a_fixed_shuffle_per_item_and_annotator():
    orders = [display_order(f"item{i}", "alice", 0, 4) for i in range(50)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert orders == [display_order(f"item{i}", "alice", 0, 4) for i in range(50)]  # stable
    assert len({tuple(o) for o in orders}) > 10  # really shuffled
    pairs = [display_order(f"item{i}", "alice", 0, 2) for i in range(50)]
    assert 10 < sum(o == [1, 0] for o in pairs) < 40  # both sides of an A/B pair shown first, about half each
    assert pairs != [display_order(f"item{i}", "bob", 0, 2) for i in range(50)]
    assert pairs != [display_order(f"item{i}", "alice", 1, 2) for i in range(50)]


def test_ab_answers_are_joined_by_prompt(tmp_path):
    a = read_candidates(write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "p1", "response": "a1", "task": "t"}, {"prompt": "p2", "response": "same"},
        {"prompt": "p3", "responses": ["a3"]}, {"prompt": "only a", "response": "x"}]))
    b = read_candidates(write_jsonl(tmp_path / "b.jsonl", [
        {"prompt": "p3", "response": "b3"}, {"prompt": "p1", "response": "b1"}, {"prompt": "p2", "response": "same"},
        {"prompt": "only b", "response": "y"}]))
    pairs, skipped = join_answers(a, b, "rlhf", "sft")
    found = ab_items(pairs, skipped)
    assert [(i.prompt, i.responses, i.models) for i in found.items] == [
        ("p1", ("a1", "b1"), ("rlhf", "sft")), ("p3", ("a3", "b3"), ("rlhf", "sft"))]
    assert found.items[0].extra == {"task": "t"}
    assert found.skipped == {"prompt answered by rlhf only": 1, "prompt answered by sft only": 1,
                             "identical answers of both models (not shown)": 1}


def test_ab_side_files_must_answer_each_prompt_once(tmp_path):
    twice = read_candidates(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "x"},
                                                                {"prompt": "p", "response": "y"}]))
    with pytest.raises(DataError, match=r"a\.jsonl, line 2, field 'prompt': repeats the prompt of line 1"):
        join_answers(twice, twice, "A", "B")
    many = read_candidates(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "responses": ["x", "y"]}]))
    with pytest.raises(DataError, match="one response per prompt"):
        join_answers(many, many, "A", "B")


def test_ab_from_one_candidates_file_with_models(tmp_path):
    rows = read_candidates(write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "p", "responses": ["s", "r", "o"], "models": ["sft", "rlhf", "other"]}]))
    pairs = ab_pairs_from_candidates(rows, "rlhf", "sft")
    assert pairs[0].responses == ("r", "s") and pairs[0].models == ("rlhf", "sft")
    with pytest.raises(DataError, match=r"line 1, field 'models': must name both ab.name_a='rlhf' and "
                                        r"ab.name_b='base'"):
        ab_pairs_from_candidates(rows, "rlhf", "base")


def test_load_items_follows_the_config(tmp_path):
    source = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(5)])
    cfg = load_config(LabelConfig, None, [f"candidates={source}", "max_items=3"])
    assert [i.prompt for i in load_items(cfg).items] == ["p0", "p1", "p2"]
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "response": "y"}])
    cfg = load_config(LabelConfig, None, ["mode=ab", f"ab.candidates_a={a}", f"ab.candidates_b={b}"])
    with pytest.raises(DataError, match="A/B compares answers to the same prompts"):
        load_items(cfg)


@pytest.mark.parametrize("overrides, message", [
    ([], "give candidates .* or model and prompts"),
    (["candidates=c.jsonl", "model=m", "prompts=p"], "exactly one of the two"),
    (["model=m"], "model: also give prompts"),
    (["model=m", "prompts=p.jsonl", "num_candidates=3"], "pairwise mode compares 2 responses"),
    (["mode=ranking", "model=m", "prompts=p.jsonl", "num_candidates=1"], "at least 2"),
    (["mode=ab", "ab.model_a=m"], "ab.model_b or ab.candidates_b"),
    (["mode=ab", "ab.model_a=m", "ab.candidates_b=b.jsonl"], "give prompts"),
    (["mode=ab", "candidates=c.jsonl", "ab.model_a=m"], "not both"),
    (["mode=ab", "model=m", "prompts=p"], "ab.model_a and ab.model_b, not model"),
    (["mode=ab", "ab.model_a=m", "ab.candidates_a=a"], "ab.model_a or ab.candidates_a, not both"),
    (["mode=ab", "candidates=c", "ab.name_b=A"], "must differ"),
    (["candidates=c", "rating_scale=[5, 1]"], "lo < hi"),
    (["candidates=c", "rating_step=0.3"], "equal steps"),
    (["candidates=c", "server.annotators={alice: short}"], "at least 16 characters"),
    (["candidates=c", "server.annotators={'a b': 0123456789abcdefgh}"], "annotator name"),
    (["candidates=c", "server.annotators={a: 0123456789abcdefgh, b: 0123456789abcdefgh}"], "share a token"),
])
def test_label_config_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(LabelConfig, None, overrides)


def test_scale_values():
    cfg = load_config(LabelConfig, None, ["candidates=c", "rating_scale=[0, 1]", "rating_step=0.25"])
    assert cfg.scale_values == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert load_config(LabelConfig, None, ["candidates=c"]).scale_values == (1.0, 2.0, 3.0, 4.0, 5.0)
