"""Generated candidates without Ray: what is generated for which mode, the files written, reuse on restart,
and the errors, without Ray: generated files are written here exactly as `ensure_generated` leaves them (the
generation itself, through the real vLLM generator, is tested in tests/label/test_with_ray.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rlhf_ray.label.config import LabelConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.label.generate import GenerationJob, candidate_rows, generation_jobs, job_key, read_prompt_rows
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


def config(tmp_path: Path, *overrides: str) -> LabelConfig:
    return load_config(LabelConfig, None, [f"output_dir={tmp_path / 'out'}", *overrides])


def test_jobs_per_mode(tmp_path, prompts):
    assert generation_jobs(config(tmp_path, "mode=ranking", "model=m", f"prompts={prompts}", "num_candidates=4")) \
        == [GenerationJob("candidates", "m", 4, False)]
    assert generation_jobs(config(tmp_path, "mode=ab", "ab.model_a=x", "ab.candidates_b=b.jsonl",
                                  f"prompts={prompts}")) == [GenerationJob("answers_a", "x", 1, True)]
    assert generation_jobs(config(tmp_path, "candidates=c.jsonl")) == []


def write_generated(cfg: LabelConfig, job: GenerationJob, rows: list[dict]) -> Path:
    """A generated file and its settings record, exactly as `ensure_generated` leaves them."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{job.name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.with_name(f"{job.name}.meta.json").write_text(json.dumps(job_key(job, cfg)))
    return path


def test_candidate_rows_keep_the_prompt_fields_and_leave_out_empty_answers(tmp_path, prompts):
    cfg = config(tmp_path, "mode=ranking", "model=m", f"prompts={prompts}", "num_candidates=3")
    rows = read_prompt_rows(cfg)
    dropped: Counter[str] = Counter()
    job = GenerationJob("candidates", "m", 3, False)
    written = candidate_rows(job, rows, [["a", "", "b"], [" ", ""], None], dropped)
    assert written == [{"prompt": "sort\ncab", "responses": ["a", "b"], "instruction": "sort", "input": "cab",
                        "task": "sort", "reference": "abc"}]  # the prompt row's fields travel along
    assert dropped == {"empty response": 3, "prompt left out: no non-empty response": 1,
                       "prompt longer than max_prompt_length": 1}
    side = candidate_rows(GenerationJob("answers_a", "m", 1, True), rows[:1], [["x"]], Counter())
    assert side == [{"prompt": "sort\ncab", "response": "x", "instruction": "sort", "input": "cab",
                     "task": "sort", "reference": "abc"}]


def test_generated_candidates_are_reused_and_not_replaced_under_judgements(tmp_path, prompts):
    cfg = config(tmp_path, "mode=ranking", "model=tiny:tiny", f"prompts={prompts}", "num_candidates=3")
    (job,) = generation_jobs(cfg)
    path = write_generated(cfg, job, [{"prompt": "sort\ncab", "responses": ["abc", "acb", "cab"]}])
    before = path.stat().st_mtime_ns
    found = load_items(cfg)  # current settings: read back, nothing generated (no Ray here)
    assert [i.responses for i in found.items] == [("abc", "acb", "cab")]
    assert path.stat().st_mtime_ns == before
    (tmp_path / "out" / LOG_FILE).write_text('{"some": "judgement"}\n')
    with pytest.raises(ConfigError, match="generated with other settings .* holds judgements"):
        load_items(config(tmp_path, "mode=ranking", "model=tiny:tiny", f"prompts={prompts}", "num_candidates=2"))


def test_ab_answers_of_two_models_are_joined(tmp_path, prompts):
    cfg = config(tmp_path, "mode=ab", "ab.model_a=tiny:tiny", "ab.model_b=tiny:tiny@1", f"prompts={prompts}",
                 "ab.name_a=rlhf", "ab.name_b=sft", "max_items=3")
    job_a, job_b = generation_jobs(cfg)
    write_generated(cfg, job_a, [{"prompt": "sort\ncab", "response": "abc"}, {"prompt": "hello", "response": "hi"},
                                 {"prompt": "later", "response": "x"}])
    write_generated(cfg, job_b, [{"prompt": "sort\ncab", "response": "acb"}, {"prompt": "hello", "response": "yo"}])
    found = load_items(cfg)
    assert sorted((i.prompt, dict(zip(i.models, i.responses))["rlhf"], dict(zip(i.models, i.responses))["sft"])
                  for i in found.items) == [("hello", "hi", "yo"), ("sort\ncab", "abc", "acb")]
    assert found.skipped == {"prompt answered by rlhf only": 1}


def test_a_missing_model_directory_is_named_before_anything_starts(tmp_path, prompts):
    (tmp_path / "runs").mkdir()
    missing = str(tmp_path / "runs" / "sft" / "model")
    with pytest.raises(ConfigError, match=f"ab.model_b: model directory {missing} does not exist"):
        load_items(config(tmp_path, "mode=ab", "ab.model_a=tiny:tiny", f"ab.model_b={missing}", f"prompts={prompts}"))
