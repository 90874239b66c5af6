"""The `rlhf-ray` launcher's error paths: every one stops with code 2 and a located message before Ray starts.

A guard replaces the training loop of both stages, so a test that wrongly got past validation fails instead
of starting Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.cli import main

STAGES = ("sft", "rm")
GOOD_SFT = {"instruction": "reverse", "input": "abc", "output": "cba"}
GOOD_RANKING = {"prompt": "sort\ncab", "responses": ["abc", "cab", "acb"], "ranking": [0, 2, 1]}


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    import ray

    import rlhf_ray.stages.rm
    import rlhf_ray.stages.sft

    def refuse(*args, **kwargs):
        raise AssertionError("validation passed and training would start Ray")

    monkeypatch.setattr(rlhf_ray.stages.sft, "run_supervised", refuse)
    monkeypatch.setattr(rlhf_ray.stages.rm, "run_supervised", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def fails(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit code 2 and nothing on stdout; the stderr message."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    return captured.err


# --- config errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_unknown_key_names_the_key_and_the_valid_ones(stage, tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", "data:\n  train: x.jsonl\n")
    err = fails([stage, config, "learner.learning_rate=1e-3"], capsys)
    assert err.startswith(f"rlhf-ray {stage}: error: ")
    assert "unknown config key learner.learning_rate" in err
    assert "lr" in err and "num_ranks" in err  # the valid keys under learner
    assert str(tmp_path / "c.yaml") in err


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_key_in_the_config_file(stage, tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", "data:\n  train: x.jsonl\nrun:\n  nmae: typo\n")
    err = fails([stage, config], capsys)
    assert "unknown config key run.nmae" in err and str(tmp_path / "c.yaml") in err


@pytest.mark.parametrize("stage", STAGES)
def test_out_of_range_value_names_the_key_and_the_bound(stage, tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", "data:\n  train: x.jsonl\n")
    err = fails([stage, config, "learner.num_ranks=0"], capsys)
    assert "learner.num_ranks: must be >= 1, got 0" in err


@pytest.mark.parametrize("stage", STAGES)
def test_missing_config_file(stage, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    err = fails([stage, str(missing), "learner.lr=1e-3"], capsys)
    assert f"config file {missing} does not exist" in err


@pytest.mark.parametrize("stage", STAGES)
def test_only_overrides_without_a_config_file(stage, capsys):
    err = fails([stage, "data.train=x.jsonl", "learner.lr=-1"], capsys)
    assert "learner.lr: must be > 0.0, got -1" in err
    assert " (in " not in err  # no config file to point at


@pytest.mark.parametrize("stage", STAGES)
def test_a_single_override_is_not_taken_for_a_config_file(stage, capsys):
    err = fails([stage, "learner.zero_stage=4"], capsys)
    assert "learner.zero_stage: must be <= 3, got 4" in err


def test_an_override_whose_value_ends_in_yaml_is_still_an_override(capsys):
    err = fails(["sft", "run.name=foo.yaml"], capsys)
    assert "data.train: required" in err and "config file" not in err


def test_a_config_file_whose_name_holds_an_equals_sign(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "lr=3e-4.yaml", "data:\n  train: x.jsonl\n")
    err = fails(["sft", "lr=3e-4.yaml", "learner.num_ranks=0"], capsys)
    assert "learner.num_ranks: must be >= 1" in err and "(in lr=3e-4.yaml)" in err
    err = fails(["sft", "sub/lr=3e-4.yaml"], capsys)
    assert "config file sub/lr=3e-4.yaml does not exist" in err


@pytest.mark.parametrize("stage", STAGES)
def test_missing_train_data_key(stage, capsys):
    err = fails([stage, "learner.lr=1e-3"], capsys)
    assert "data.train: required" in err


def test_wrong_choice_lists_the_valid_ones(capsys):
    err = fails(["rm", "data.train=x.jsonl", "loss.ranking_loss=listnet"], capsys)
    assert "loss.ranking_loss" in err and "'pairwise'" in err and "'plackett_luce'" in err


# --- data errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_data_file_that_does_not_exist(stage, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    err = fails([stage, f"data.train={missing}", "model.path=tiny:tiny"], capsys)
    assert f"{missing}: file not found" in err


def test_feedback_row_with_a_bad_ranking_names_file_line_and_field(tmp_path, capsys):
    data = write_jsonl(tmp_path / "ranking.jsonl", [GOOD_RANKING, {**GOOD_RANKING, "ranking": [0, 0, 1]}])
    config = write_yaml(tmp_path / "rm.yaml", f"model:\n  path: tiny:tiny\ndata:\n  train: {data}\n")
    err = fails(["rm", config], capsys)
    assert f"{data}, line 2, field 'ranking': must be a permutation of 0..2" in err
    assert "[0, 0, 1]" in err


def test_sft_row_with_a_missing_field_names_file_line_and_field(tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, GOOD_SFT, {"instruction": "reverse", "input": "ab"}])
    err = fails(["sft", f"data.train={data}", "model.path=tiny:tiny"], capsys)
    assert f"{data}, line 3" in err and "'output'" in err


def test_valid_feedback_gets_past_validation_to_training(tmp_path):
    # The positive control of every test above: good data reaches the (guarded) training loop.
    data = write_jsonl(tmp_path / "ranking.jsonl", [GOOD_RANKING, {**GOOD_RANKING, "prompt": "sort\nbca"}])
    with pytest.raises(AssertionError, match="would start Ray"):
        main(["rm", f"data.train={data}", "model.path=tiny:tiny"])


# --- help and synth-data -----------------------------------------------------------------------

@pytest.mark.parametrize("stage, keys", [
    ("sft", ["data.train", "data.overlong", "learner.lr", "learner.zero_stage", "run.max_steps", "eval.num_generate"]),
    ("rm", ["data.train", "data.rating_scale", "data.ratings_to_pairs", "loss.ranking_loss", "learner.lr"]),
])
def test_help_lists_every_stage_key(stage, keys, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "config keys:" in out
    for key in keys:
        assert f"  {key} = " in out, key


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: rlhf-ray" in capsys.readouterr().err


def test_synth_data_writes_the_sft_and_feedback_files(tmp_path, capsys):
    out_dir = tmp_path / "generated"
    code = main(["synth-data", str(out_dir), "--n-train", "12", "--n-eval", "6", "--tasks", "reverse,sort"])
    assert code == 0
    printed = capsys.readouterr().out
    names = ["sft"] + [f"{kind}" for kind in ("pairwise", "rating", "ranking")]
    for name in names:
        for split in ("train", "eval"):
            path = out_dir / f"{name}_{split}.jsonl"
            assert path.is_file(), path
            assert str(path) in printed
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert rows and all(isinstance(r, dict) for r in rows)
    sft_rows = [json.loads(line) for line in (out_dir / "sft_train.jsonl").read_text().splitlines()]
    assert len(sft_rows) == 12 and {r["task"] for r in sft_rows} == {"reverse", "sort"}
    assert len((out_dir / "sft_eval.jsonl").read_text().splitlines()) == 6
