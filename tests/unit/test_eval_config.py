"""The `eval` section: one shape for every stage with per-stage defaults, and the keys that moved into it."""

from __future__ import annotations

import pytest

from rlhf_ray.config import EvalConfig, PipelineConfig, RLHFConfig, RMConfig, SFTConfig
from rlhf_ray.config_loader import MOVED_KEYS, ConfigError, load_config
from rlhf_ray.stages.rlhf import eval_max_new_tokens

RLHF = ["data.train=p.jsonl", "run.max_steps=1", "reward.functions=[{path: 'rlhf_ray.rewards.tasks:task_score'}]"]


def test_every_stage_has_the_same_eval_section_with_its_own_defaults():
    sft = load_config(SFTConfig, None, ["data.train=a.jsonl"]).eval
    rm = load_config(RMConfig, None, ["data.train=a.jsonl"]).eval
    rlhf = load_config(RLHFConfig, None, RLHF).eval
    assert type(sft) is type(rm) is type(rlhf) is EvalConfig
    assert sft == EvalConfig(at_start=True, num_print=4, num_generate=64, max_new_tokens=32,
                             checker="rlhf_ray.rewards.tasks:check_answer")
    assert rm.num_print == 3 and rm.at_start
    assert rlhf.max_new_tokens is None and rlhf.num_generate == 64 and rlhf.num_print == 4
    assert rlhf.checker == sft.checker


def test_a_yaml_eval_section_merges_over_the_stage_defaults(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("data: {train: a.jsonl}\neval: {at_start: false}\n")
    assert load_config(RMConfig, path).eval == EvalConfig(at_start=False, num_print=3)
    path.write_text("\n".join(["data: {train: p.jsonl}", "run: {max_steps: 1}",
                               "reward: {functions: [{path: 'rlhf_ray.rewards.tasks:task_score'}]}",
                               "eval: {num_generate: 8, checker: null}"]))
    rlhf = load_config(RLHFConfig, path).eval
    assert (rlhf.num_generate, rlhf.checker, rlhf.max_new_tokens) == (8, None, None)


def test_the_rlhf_eval_may_give_its_own_answer_length():
    assert load_config(RLHFConfig, None, [*RLHF, "eval.max_new_tokens=12"]).eval.max_new_tokens == 12
    with pytest.raises(ConfigError, match="eval.max_new_tokens: must be >= 1"):
        load_config(RLHFConfig, None, [*RLHF, "eval.max_new_tokens=0"])


def test_a_moved_key_names_its_new_place():
    assert MOVED_KEYS["data.max_eval_prompts"] == "eval.num_generate"
    with pytest.raises(ConfigError, match="^`data.max_eval_prompts` is now `eval.num_generate`$"):
        load_config(RLHFConfig, None, [*RLHF, "data.max_eval_prompts=8"])


def test_a_moved_key_under_a_pipeline_stage_keeps_the_stage_prefix(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("sft: {data: {train: a.jsonl}}\nrlhf: {data: {train: p.jsonl, max_eval_prompts: 8}}\n")
    with pytest.raises(ConfigError, match=r"`rlhf\.data\.max_eval_prompts` is now `rlhf\.eval\.num_generate` "
                                          r"\(in .*pipeline\.yaml\)"):
        load_config(PipelineConfig, path)


def test_other_unknown_keys_still_list_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown config key eval.max_eval_prompts; valid keys under eval: "
                                          "at_start, num_print, num_generate, max_new_tokens, checker"):
        load_config(RLHFConfig, None, [*RLHF, "eval.max_eval_prompts=8"])


def test_the_rlhf_eval_answers_as_long_as_the_rollouts_unless_told():
    cfg = load_config(RLHFConfig, None, [*RLHF, "generator.max_new_tokens=20"])
    assert eval_max_new_tokens(cfg) == 20
    assert eval_max_new_tokens(load_config(RLHFConfig, None, [*RLHF, "eval.max_new_tokens=7"])) == 7
