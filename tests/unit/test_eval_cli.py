"""`rlhf-ray eval MODEL CONFIG`: argument parsing, the resolved plan (reference, baseline, output directory), the
A/B files as the labeling page loads them, the table; error paths stop with code 2 before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlhf_ray.cli import build_parser, main
from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.label.config import LabelConfig
from rlhf_ray.label.items import load_items
from rlhf_ray.stages.evaluate import format_table, plan_eval, write_ab_files


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("validation passed and the evaluation would start Ray")

    monkeypatch.setattr(ray, "init", refuse)


def rlhf_cfg(*overrides: str) -> RLHFConfig:
    return load_config(RLHFConfig, None, ["data.train=prompts.jsonl", "run.max_steps=1",
                                          "policy.path=runs/sft/model", *overrides])


def test_parser_takes_model_then_config_then_overrides_and_options():
    args = build_parser().parse_args(["eval", "runs/x/model", "configs/tiny-cpu/rlhf.yaml", "eval.num_generate=8",
                                      "run.name=e", "--baseline", "runs/sft/model", "--reference", "none",
                                      "--output-dir", "out"])
    assert (args.command, args.model, args.config) == ("eval", "runs/x/model", "configs/tiny-cpu/rlhf.yaml")
    assert args.overrides == ["eval.num_generate=8", "run.name=e"]
    assert (args.baseline, args.reference, args.output_dir) == ("runs/sft/model", "none", "out")
    plain = build_parser().parse_args(["eval", "tiny:tiny"])
    assert (plain.model, plain.config, plain.overrides, plain.baseline) == ("tiny:tiny", None, [], None)


def test_parser_needs_a_model(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["eval"])
    assert exc.value.code == 2
    assert "model" in capsys.readouterr().err


def test_plan_defaults_reference_and_baseline_to_the_configs_policy():
    plan = plan_eval(rlhf_cfg("run.output_dir=/tmp/o", "run.name=r"), "runs/rlhf/model")
    assert plan.model == plan.config.policy.path == "runs/rlhf/model"
    assert plan.reference == plan.baseline == plan.config.reference.path == "runs/sft/model"
    assert plan.out_dir == Path("/tmp/o/r-eval")


def test_plan_reference_path_and_explicit_choices():
    cfg = rlhf_cfg("reference.path=runs/ref/model")
    plan = plan_eval(cfg, "m", baseline="runs/b/model", output_dir="elsewhere")
    assert (plan.reference, plan.baseline, plan.out_dir) == ("runs/ref/model", "runs/b/model", Path("elsewhere"))
    off = plan_eval(cfg, "m", reference="none")
    assert off.reference is None and off.baseline is None  # the baseline defaults to the (absent) reference
    assert plan_eval(cfg, "m", reference="NONE", baseline="runs/b").baseline == "runs/b"
    assert plan_eval(cfg, "m", baseline="none").reference == "runs/ref/model"
    with pytest.raises(ConfigError, match="MODEL"):
        plan_eval(cfg, " ")


def test_main_only_overrides_and_a_missing_model_stop_before_ray(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code = main(["eval", str(missing), "data.train=p.jsonl", "run.max_steps=1",
                 "reward.functions=[{path: rlhf_ray.rewards.tasks:task_score}]", f"run.output_dir={tmp_path}"])
    assert code == 2
    assert f"MODEL: model directory {missing} does not exist" in capsys.readouterr().err


def test_main_missing_config_and_no_reward(tmp_path, capsys):
    assert main(["eval", "tiny:tiny", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    assert main(["eval", "tiny:tiny", "data.train=p.jsonl", "run.max_steps=1"]) == 2
    assert "reward:" in capsys.readouterr().err


def answer(prompt, response, **meta) -> dict:
    return {"prompt": prompt, "response": response, **meta}


def test_ab_files_load_with_the_label_pages_loader(tmp_path):
    a = [answer("sort\ncab", "abc", task="sort"), answer("reverse\nab", "ba", task="reverse"),
         answer([{"role": "user", "content": "add\n1 2"}], "3"), answer("sort\nba", "", task="sort")]
    b = [answer("sort\ncab", "acb", task="sort"), answer("reverse\nab", "ba", task="reverse"),
         answer([{"role": "user", "content": "add\n1 2"}], "4"), answer("sort\nba", "ab", task="sort")]
    files = write_ab_files(tmp_path, a, b)
    assert len(files["answers_a"].read_text().splitlines()) == 3  # the empty answer is left out
    raw = yaml.safe_load(files["label"].read_text())
    cfg = load_config(LabelConfig, files["label"], [])
    assert cfg.mode == "ab" and (cfg.ab.name_a, cfg.ab.name_b) == ("model", "baseline")
    assert Path(raw["output_dir"]) == (tmp_path / "labels").resolve()
    found = load_items(cfg)
    pairs = {json.dumps(item.prompt): item.responses for item in found.items}
    # identical answers are not shown; the prompt only B answered is counted
    assert pairs == {json.dumps("sort\ncab"): ("abc", "acb"), json.dumps("add\n1 2"): ("3", "4")}
    assert all(item.models == ("model", "baseline") for item in found.items)
    assert found.items[0].extra == {"task": "sort"}
    assert sum(found.skipped.values()) == 2


def test_format_table_has_a_column_per_model_and_marks_missing_metrics():
    report = {"metrics": {"reward": 0.5, "kl": 0.01, "accuracy": 0.75},
              "baseline_metrics": {"reward": 0.25, "accuracy": 0.5}}
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["metric", "model", "baseline"]
    assert lines[1].split() == ["reward", "0.5000", "0.2500"]
    assert lines[2].split() == ["kl", "0.0100", "-"]
    assert format_table({"metrics": {"reward": 1.0}}).splitlines()[0].split() == ["metric", "model"]


def test_no_label_yaml_when_a_side_has_no_answer(tmp_path, capsys):
    (tmp_path / "label.yaml").write_text("stale")
    files = write_ab_files(tmp_path, [answer("p", " ")], [answer("p", "x")])
    assert "label" not in files and not (tmp_path / "label.yaml").exists()
    assert "model: 1 of 1 answers are empty" in capsys.readouterr().out
