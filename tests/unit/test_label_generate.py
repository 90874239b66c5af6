"""Generated candidates without Ray: what is generated for which mode, the files written, reuse on restart,
and the errors. `generate_responses` (the vLLM part, tested with Ray in tests/label) is replaced by a stub."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

import rlhf_ray.distributed.runtime
import rlhf_ray.label.generate as generate
from rlhf_ray.config import LabelConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.data.errors import DataError
from rlhf_ray.label.generate import GenerationJob, generation_jobs
from rlhf_ray.label.items import load_items
from rlhf_ray.label.store import LOG_FILE

PROMPTS = [{"instruction": "sort", "input": "cab", "output": "abc", "task": "sort"},
           {"prompt": "hello"},
           {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]}]


@pytest.fixture
def prompts(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return str(path)


@pytest.fixture
def fake_vllm(monkeypatch):
    """Answers "<model> <prompt number>.<sample>", except the answers listed in `empty`; counts calls."""
    calls = []
    empty: set[tuple[str, int]] = set()

    def fake(job, rows, cfg):
        calls.append(job.name)
        return [[("" if (job.model, i) in empty else f"{job.model} {i}.{s}") for s in range(job.n)]
                for i in range(len(rows))]

    monkeypatch.setattr(generate, "generate_responses", fake)
    monkeypatch.setattr(rlhf_ray.distributed.runtime, "ray_session", lambda *a, **k: contextlib.nullcontext())
    return calls, empty


def config(tmp_path: Path, *overrides: str) -> LabelConfig:
    return load_config(LabelConfig, None, [f"output_dir={tmp_path / 'out'}", *overrides])


def test_jobs_per_mode(tmp_path, prompts):
    assert generation_jobs(config(tmp_path, "mode=ranking", "model=m", f"prompts={prompts}", "num_candidates=4")) \
        == [GenerationJob("candidates", "m", 4, False)]
    assert generation_jobs(config(tmp_path, "mode=ab", "ab.model_a=x", "ab.candidates_b=b.jsonl",
                                  f"prompts={prompts}")) == [GenerationJob("answers_a", "x", 1, True)]
    assert generation_jobs(config(tmp_path, "candidates=c.jsonl")) == []


def test_k_candidates_per_prompt_are_written_then_reused(tmp_path, prompts, fake_vllm):
    calls, empty = fake_vllm
    empty.add(("m", 1))  # prompt 1 gets only empty answers
    cfg = config(tmp_path, "mode=ranking", "model=m", f"prompts={prompts}", "num_candidates=3")
    found = load_items(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "candidates.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["sort\ncab", [{"role": "system", "content": "be kind"},
                                                         {"role": "user", "content": "hi"}]]
    assert rows[0] == {"prompt": "sort\ncab", "responses": ["m 0.0", "m 0.1", "m 0.2"], "instruction": "sort",
                       "input": "cab", "task": "sort", "reference": "abc"}  # the prompt row's fields travel along
    assert [i.responses for i in found.items] == [("m 0.0", "m 0.1", "m 0.2"), ("m 2.0", "m 2.1", "m 2.2")]
    assert json.loads((tmp_path / "out" / "candidates.meta.json").read_text())["model"] == "m"
    assert load_items(cfg).items == found.items and calls == ["candidates"]  # reused, not generated again
    # Other settings, no judgements yet: generated afresh.
    load_items(config(tmp_path, "mode=ranking", "model=m", f"prompts={prompts}", "num_candidates=2"))
    assert calls == ["candidates", "candidates"]
    (tmp_path / "out" / LOG_FILE).write_text('{"some": "judgement"}\n')
    with pytest.raises(ConfigError, match="generated with other settings .* holds judgements"):
        load_items(cfg)


def test_ab_answers_of_two_models_are_joined(tmp_path, prompts, fake_vllm):
    calls, empty = fake_vllm
    empty.add(("tiny:tiny@1", 2))
    cfg = config(tmp_path, "mode=ab", "ab.model_a=tiny:tiny", "ab.model_b=tiny:tiny@1", f"prompts={prompts}",
                 "ab.name_a=rlhf", "ab.name_b=sft", "max_items=3")
    found = load_items(cfg)
    assert calls == ["answers_a", "answers_b"]
    assert [(i.prompt, i.responses, i.models) for i in found.items] == [
        ("sort\ncab", ("tiny:tiny 0.0", "tiny:tiny@1 0.0"), ("rlhf", "sft")),
        ("hello", ("tiny:tiny 1.0", "tiny:tiny@1 1.0"), ("rlhf", "sft"))]
    assert found.skipped == {"prompt answered by rlhf only": 1}


def test_a_model_that_answers_nothing_and_a_missing_model_directory(tmp_path, prompts, fake_vllm):
    _, empty = fake_vllm
    empty.update({("m", 0), ("m", 1), ("m", 2)})
    with pytest.raises(DataError, match="m gave no non-empty response to any prompt"):
        load_items(config(tmp_path, "mode=rating", "model=m", f"prompts={prompts}"))
    (tmp_path / "runs").mkdir()
    missing = str(tmp_path / "runs" / "sft" / "model")
    with pytest.raises(ConfigError, match=f"ab.model_b: model directory {missing} does not exist"):
        load_items(config(tmp_path, "mode=ab", "ab.model_a=tiny:tiny", f"ab.model_b={missing}", f"prompts={prompts}"))
