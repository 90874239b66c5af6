"""Candidates written by a model: k responses per prompt (one per model for A/B) from the project's vLLM
generator (`GeneratorGroup`), saved in the output directory and reused on restart.

Saving first matters: judgements refer to items by a hash of their responses, and sampling repeats exactly
only on the same software and hardware, so a restarted server must show the responses it showed before.
`<name>.meta.json` beside each file records the settings that produced it; different settings while the
directory already holds judgements stop with an error instead of silently showing new responses.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.config import ModelConfig
from rlhf_ray.config_loader import ConfigError
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.loading import collect_valid, read_records
from rlhf_ray.data.synthetic import write_jsonl
from rlhf_ray.label.config import LabelConfig
from rlhf_ray.label.items import RESERVED_FIELDS, prompt_value
from rlhf_ray.label.store import LOG_FILE


@dataclass(frozen=True)
class GenerationJob:
    name: str
    """File stem in the output directory: candidates, answers_a or answers_b."""
    model: str
    n: int
    greedy: bool


def generation_jobs(cfg: LabelConfig) -> list[GenerationJob]:
    """What to generate for `cfg`: k samples per prompt from `model`, or one answer per A/B model."""
    if cfg.mode != "ab":
        return [GenerationJob("candidates", cfg.model, cfg.num_candidates, False)] if cfg.model else []
    return [GenerationJob(f"answers_{side}", model, 1, cfg.ab.greedy)
            for side, model in (("a", cfg.ab.model_a), ("b", cfg.ab.model_b)) if model]


def _file_sha256(source: str) -> Optional[str]:
    path = Path(source)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def job_key(job: GenerationJob, cfg: LabelConfig) -> dict[str, Any]:
    """Everything the generated responses depend on."""
    gen = cfg.generator
    return {"model": job.model, "n": job.n, "greedy": job.greedy, "prompts": cfg.prompts,
            "prompts_sha256": _file_sha256(cfg.prompts), "max_items": cfg.max_items,
            "max_prompt_length": cfg.max_prompt_length, "seed": cfg.seed, "temperature": gen.temperature,
            "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens, "dtype": gen.dtype}


def _meta_path(path: Path) -> Path:
    return path.with_name(path.stem + ".meta.json")


def is_current(path: Path, key: dict[str, Any]) -> bool:
    """Whether `path` holds responses generated with `key`. Different ones with judgements around: an error."""
    meta = _meta_path(path)
    if not path.is_file() or not meta.is_file():
        return False
    if json.loads(meta.read_text(encoding="utf-8")) == key:
        return True
    log = path.parent / LOG_FILE
    if log.is_file() and log.stat().st_size > 0:
        raise ConfigError(f"{path} was generated with other settings than this config's (model, prompts, "
                          f"sampling; see {meta.name}) and {log} holds judgements of those responses; use another "
                          "output_dir, or delete the file to generate afresh")
    return False


def read_prompt_rows(cfg: LabelConfig) -> list:
    """The prompts file's rows (`PromptRow`), the first `max_items`."""
    # Deferred: data.prompts loads torch (through rollout.schema), which only generation needs.
    from rlhf_ray.data.prompts import parse_prompt

    rows, _ = collect_valid(read_records(cfg.prompts), parse_prompt, skip_invalid=False, source=cfg.prompts)
    return rows[:cfg.max_items] if cfg.max_items else rows


def generate_responses(job: GenerationJob, rows: list, cfg: LabelConfig) -> list[Optional[list[str]]]:
    """`job.n` responses per prompt row from one `GeneratorGroup` (None where the prompt is too long).
    Needs Ray initialised."""
    # Deferred: Ray, torch, transformers and the vLLM generator take about 3 s to import, and a restarted
    # `rlhf-ray label` that reuses the saved files needs none of them.
    import pyarrow as pa
    import ray

    from rlhf_ray.data.sft import encode, render, require_chat_template
    from rlhf_ray.distributed.runtime import cluster_device
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.roles.generator import GeneratorGroup, Sampling
    from rlhf_ray.rollout.schema import PROMPT_SCHEMA

    tokenizer = load_tokenizer(ModelConfig(path=job.model))
    require_chat_template(tokenizer)
    texts = [render(tokenizer, row.messages, generation_prompt=True) for row in rows]
    ids = [encode(tokenizer, text) for text in texts]
    fits = [i for i, prompt in enumerate(ids) if len(prompt) <= cfg.max_prompt_length]
    table = pa.Table.from_pydict({"prompt_ids": [ids[i] for i in fits], "prompt_text": [texts[i] for i in fits],
                                  "metadata": ["{}"] * len(fits),
                                  "prompt_messages": [list(rows[i].messages) for i in fits]}, schema=PROMPT_SCHEMA)
    gen = cfg.generator
    group = GeneratorGroup(job.model, gen, cfg.seed, cluster_device("auto"), name=f"label-{job.name}")
    try:
        sampling = Sampling(job.n, 0.0 if job.greedy else gen.temperature, gen.max_new_tokens, gen.top_p, cfg.seed)
        refs = group.generate(ray.put(table), list(range(len(fits))), sampling)
        out = pa.concat_tables(ray.get(refs)).select(["prompt_index", "response_text"]).to_pydict()
    finally:
        group.shutdown()
    responses: list[Optional[list[str]]] = [None] * len(rows)
    for row, text in zip(out["prompt_index"], out["response_text"]):
        responses[fits[row]] = (responses[fits[row]] or []) + [text]
    return responses


def candidate_rows(job: GenerationJob, rows: list, responses: list[Optional[list[str]]],
                   dropped: Counter[str]) -> list[dict[str, Any]]:
    """Rows of the generated file: `{prompt, responses}` (or `{prompt, response}` for an A/B side) plus the
    prompt row's metadata. Empty responses (the reward-model formats refuse them) are left out and counted."""
    out = []
    for row, texts in zip(rows, responses):
        if texts is None:
            dropped["prompt longer than max_prompt_length"] += 1
            continue
        kept = [t for t in texts if t.strip()]
        dropped["empty response"] += len(texts) - len(kept)
        if not kept:
            dropped["prompt left out: no non-empty response"] += 1
            continue
        meta = {k: v for k, v in row.metadata.items() if k not in RESERVED_FIELDS}
        answer = {"response": kept[0]} if job.name.startswith("answers_") else {"responses": kept}
        out.append({"prompt": prompt_value(row.messages), **answer, **meta})
    return out


def check_model_path(model: str, key: str) -> None:
    """A local-looking model path that does not exist stops here, not deep inside the engine. (A path whose
    first part is a local directory, e.g. runs/x/model; hub names such as Qwen/Qwen2.5-0.5B pass.)"""
    path = Path(model)
    if not model.startswith("tiny:") and not path.exists() and (path.is_absolute() or Path(path.parts[0]).is_dir()):
        raise ConfigError(f"{key}: model directory {model} does not exist")


def ensure_generated(cfg: LabelConfig) -> dict[str, Path]:
    """Generate what `cfg` asks for unless the output directory already holds it; {job name: file}."""
    # Deferred: Ray is needed only when something is left to generate.
    from rlhf_ray.distributed.runtime import ray_session

    jobs = generation_jobs(cfg)
    for job in jobs:
        check_model_path(job.model, "model" if job.name == "candidates" else f"ab.model_{job.name[-1]}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {job.name: out / f"{job.name}.jsonl" for job in jobs}
    pending = [job for job in jobs if not is_current(paths[job.name], job_key(job, cfg))]
    for job in jobs:
        if job not in pending:
            print(f"[label] reusing {paths[job.name]} ({job.model}); delete it to generate afresh")
    if not pending:
        return paths
    rows = read_prompt_rows(cfg)
    with ray_session(cfg.ray_address, cfg.num_cpus):
        for job in pending:
            dropped: Counter[str] = Counter()
            written = candidate_rows(job, rows, generate_responses(job, rows, cfg), dropped)
            if not written:
                raise DataError(cfg.prompts, f"{job.model} gave no non-empty response to any prompt",
                                detail=", ".join(f"{reason}: {n}" for reason, n in (+dropped).items()))
            write_jsonl(written, paths[job.name])
            _meta_path(paths[job.name]).write_text(json.dumps(job_key(job, cfg), indent=2), encoding="utf-8")
            extra = "".join(f", {reason}: {n}" for reason, n in (+dropped).items())
            print(f"[label] {job.model} answered {len(written)} of {len(rows)} prompts x {job.n} -> "
                  f"{paths[job.name]}{extra}")
    return paths
