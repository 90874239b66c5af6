"""The evaluation's answer checker (`eval.checker`): loading by import path, grading, and the SFT metrics."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pytest

from rlhf_ray.config import EvalConfig, RLHFConfig, SFTConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.rewards import RewardFunctionError
from rlhf_ray.rewards.checker import grade_answers, grade_summary, load_checker
from rlhf_ray.rewards.tasks import check_answer
from rlhf_ray.stages.rlhf import run_rlhf
from rlhf_ray.stages.sft import SFTEvaluator, score_answers

CHECKERS = '''
def exact(metadata, response):
    """1.0 when the response is the row's reference; a row without one cannot be graded."""
    if "reference" not in metadata:
        return None
    return float(response.strip() == metadata["reference"])


def broken(metadata, response):
    return metadata["missing"]


def text(metadata, response):
    return "yes"


def nan(metadata, response):
    return float("nan")
'''


@pytest.fixture
def checkers(tmp_path, monkeypatch):
    """The import name of a user module of checkers (written to a directory put on sys.path)."""
    (tmp_path / "my_eval_checkers.py").write_text(CHECKERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_eval_checkers"
    sys.modules.pop("my_eval_checkers", None)


def sft_eval(*overrides: str) -> SFTEvaluator:
    """An SFT evaluator over four held-out rows: two of task a, one of task b, one without a task."""
    cfg = load_config(SFTConfig, None, ["data.train=unused.jsonl", *overrides])
    metas = [{"task": "a"}, {"task": "a"}, {"task": "b"}, {"id": 7}]
    table = pa.Table.from_pydict({"prompt_text": [f"p{i}" for i in range(4)],
                                  "reference": [f"r{i}" for i in range(4)],
                                  "metadata": [json.dumps(m) for m in metas]})
    return SFTEvaluator(cfg.eval, table)


def test_a_custom_checker_grades_the_sft_answers(checkers):
    evaluator = sft_eval(f"eval.checker={checkers}:exact")
    # The checker sees each row's extra fields plus its reference answer.
    assert evaluator.metadata[0] == {"reference": "r0", "task": "a"}
    grades = grade_answers(evaluator.cfg.checker, evaluator.metadata, ["r0", "wrong", "r2", " r3 "])
    assert grades == [1.0, 0.0, 1.0, 1.0]
    assert score_answers(evaluator.metadata, grades) == {"accuracy": 0.75, "score": 0.75, "accuracy/a": 0.5,
                                                         "accuracy/b": 1.0}


def test_the_default_checker_grades_the_synthetic_tasks_only():
    metas = [{"task": "reverse", "input": "abc"}, {"task": "sort", "input": "cab"},
             {"task": "reverse", "input": "hello"}, {"id": 3}, {"task": "poetry", "input": "x"}]
    grades = grade_answers(EvalConfig().checker, metas, ["cba", "acb", "olleh", "anything", "x"])
    assert grades == [1.0, pytest.approx(1 / 3), 1.0, None, None]  # "acb" for "abc": 1 of 3 positions
    metrics = score_answers(metas, grades)
    assert metrics == pytest.approx({"accuracy": 2 / 3, "score": (2 + 1 / 3) / 3, "accuracy/reverse": 1.0,
                                     "accuracy/sort": 0.0})
    assert grade_summary(grades) == pytest.approx((2 / 3, (2 + 1 / 3) / 3))


def test_check_answer_is_the_task_score_of_a_synthetic_row():
    assert check_answer({"task": "add", "input": "2+3"}, "5") == 1.0
    assert check_answer({"task": "add", "input": "2+3"}, "6") == 0.0
    assert check_answer({"task": "add"}, "5") is None  # no input: cannot be graded
    assert check_answer({}, "5") is None


def test_a_null_checker_gives_no_accuracy_metrics():
    evaluator = sft_eval("eval.checker=null")
    grades = grade_answers(evaluator.cfg.checker, evaluator.metadata, ["r0", "r1", "r2", "r3"])
    assert grades == [None] * 4
    assert score_answers(evaluator.metadata, grades) == {}
    assert grade_summary(grades) is None


@pytest.mark.parametrize("path, message", [
    ("no_such_module_xyz:check", r"eval\.checker 'no_such_module_xyz:check': cannot import 'no_such_module_xyz'"),
    ("rlhf_ray.rewards.tasks:nope", r"eval\.checker 'rlhf_ray.rewards.tasks:nope': rlhf_ray.rewards.tasks has "
                                    r"no callable 'nope'"),
    ("rlhf_ray.rewards.tasks.check_answer", r"eval\.checker .*: expected 'package.module:function'"),
])
def test_a_bad_checker_path_fails_when_the_stage_starts_naming_the_key(path, message):
    with pytest.raises(RewardFunctionError, match=message):
        sft_eval(f"eval.checker={path}")
    with pytest.raises(RewardFunctionError, match=message):
        load_checker(path)


def test_rlhf_fails_on_a_bad_checker_path_before_reading_data_or_starting_ray(tmp_path, tiny_tokenizer):
    cfg = load_config(RLHFConfig, None, [
        f"data.train={tmp_path / 'missing.jsonl'}", "run.max_steps=1", "policy.path=tiny:tiny",
        "reward.functions=[{path: 'rlhf_ray.rewards.tasks:task_score'}]", "eval.checker=no_such_module_xyz:f"])
    with pytest.raises(RewardFunctionError, match=r"eval\.checker 'no_such_module_xyz:f'"):
        run_rlhf(cfg)


@pytest.mark.parametrize("name, message", [
    ("broken", r"eval\.checker my_eval_checkers:broken raised KeyError: 'missing'"),
    ("text", r"eval\.checker my_eval_checkers:text must return a finite number or None, got 'yes'"),
    ("nan", r"eval\.checker my_eval_checkers:nan must return a finite number or None, got nan"),
])
def test_a_checker_that_misbehaves_is_named(checkers, name, message):
    with pytest.raises(RewardFunctionError, match=message):
        grade_answers(f"{checkers}:{name}", [{"task": "a"}], ["answer"])


def test_sft_needs_a_number_of_new_tokens():
    with pytest.raises(ConfigError, match="eval.max_new_tokens: SFT needs a number"):
        sft_eval("eval.max_new_tokens=null")
