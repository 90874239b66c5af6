"""Held-out RLHF prompts: with `data.eval` null a seeded split is made, never the first training prompts."""

from __future__ import annotations

import pytest

from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.data.synthetic import write_jsonl
from rlhf_ray.stages.rlhf import load_prompt_splits


def config(path, *overrides) -> RLHFConfig:
    return load_config(RLHFConfig, None, [f"data.train={path}", "run.max_steps=1", "policy.path=tiny:tiny",
                                          "reward.functions=[{path: 'rlhf_ray.rewards.tasks:task_score'}]",
                                          *overrides])


def test_without_eval_a_seeded_share_is_held_out_and_never_trained_on(tmp_path, tiny_tokenizer):
    path = write_jsonl([{"prompt": f"question {i}"} for i in range(100)], tmp_path / "p.jsonl")
    train, held, stats = load_prompt_splits(config(path, "data.eval_fraction=0.1"), tiny_tokenizer)
    train_texts, held_texts = set(train.column("prompt_text").to_pylist()), held.column("prompt_text").to_pylist()
    assert held.num_rows == 10 and train.num_rows == 90 and stats["held_out_for_eval"] == 10
    assert not train_texts & set(held_texts)
    first = [f"question {i}" for i in range(10)]
    assert not all(q in t for q, t in zip(first, held_texts))  # not simply the first rows
    again = load_prompt_splits(config(path, "data.eval_fraction=0.1"), tiny_tokenizer)[1]
    assert again.column("prompt_text").to_pylist() == held_texts  # same seed, same split
    other = load_prompt_splits(config(path, "data.eval_fraction=0.1", "run.seed=5"), tiny_tokenizer)[1]
    assert other.column("prompt_text").to_pylist() != held_texts


def test_eval_num_generate_caps_the_held_out_share(tmp_path, tiny_tokenizer):
    path = write_jsonl([{"prompt": f"q{i}"} for i in range(100)], tmp_path / "p.jsonl")
    train, held, _ = load_prompt_splits(config(path, "data.eval_fraction=0.5", "eval.num_generate=8"),
                                        tiny_tokenizer)
    assert (train.num_rows, held.num_rows) == (92, 8)


def test_an_eval_file_is_used_as_given(tmp_path, tiny_tokenizer):
    path = write_jsonl([{"prompt": f"q{i}"} for i in range(20)], tmp_path / "p.jsonl")
    eval_path = write_jsonl([{"prompt": "held"}], tmp_path / "e.jsonl")
    train, held, _ = load_prompt_splits(config(path, f"data.eval={eval_path}"), tiny_tokenizer)
    assert train.num_rows == 20 and held.num_rows == 1


def test_one_prompt_and_no_eval_file_is_an_error_naming_the_key(tmp_path, tiny_tokenizer):
    path = write_jsonl([{"prompt": "only"}], tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="give data.eval"):
        load_prompt_splits(config(path), tiny_tokenizer)


def test_rlhf_needs_at_least_one_held_out_prompt(tmp_path, tiny_tokenizer):
    path = write_jsonl([{"prompt": f"q{i}"} for i in range(20)], tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="eval.num_generate: RLHF evaluates on held-out prompts; must be >= 1"):
        load_prompt_splits(config(path, "eval.num_generate=0"), tiny_tokenizer)
