"""The policy objective through a real learner group (2 ranks, DeepSpeed ZeRO-2 and ZeRO-3, gloo), at temperature
0.7, sequence aggregation, KL in the loss.

Invariants: the learner's pi_old (no-grad path) equals its logprobs inside the training step (DeepSpeed
forward, chunked head or, under ZeRO-3, one head call): approx_kl is 0 and no token is clipped; the loss
equals the hand value `Σ_seq [-mean(A) + c · mean(log π - log π_ref)] / n_seq` (the KL term aggregated like
the policy term); with the ratio moved to e on every token the clip fraction is the share of tokens with a
positive advantage, at most 1 although tokens outnumber sequences.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
import ray
import torch

from rlhf_ray.config import LearnerConfig, ModelConfig

KL_COEF = 0.3
OPTIONS = {"aggregation": "sequence", "kl_in_loss": True, "kl_estimator": "k1", "temperature": 0.7}


def experience(tokenizer, old: list[list[float]] | None = None) -> pa.Table:
    gen = torch.Generator().manual_seed(5)
    prompts = [tokenizer(f"<|user|>word {i}<|end|><|assistant|>", add_special_tokens=False).input_ids
               for i in range(8)]
    lengths = [1, 4, 2, 6, 3, 5, 1, 2]
    responses = [torch.randint(10, 200, (n,), generator=gen).tolist() for n in lengths]
    floats = pa.list_(pa.float32())
    advantages = [torch.randn(n, generator=gen).tolist() for n in lengths]
    ref = [(-3.0 - torch.rand(n, generator=gen)).tolist() for n in lengths]
    ids = pa.list_(pa.int32())
    return pa.table({"prompt_ids": pa.array(prompts, ids), "response_ids": pa.array(responses, ids),
                     "old_logprobs": pa.array(old or [[0.0] * n for n in lengths], floats),
                     "advantages": pa.array(advantages, floats), "ref_logprobs": pa.array(ref, floats),
                     "kl_coef": pa.array([KL_COEF] * len(lengths), pa.float64())})


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def learners(request, ray_cluster, tiny_model_path):
    from rlhf_ray.distributed.runtime import worker_env_vars
    from rlhf_ray.roles.learner import LearnerGroup
    from rlhf_ray.roles.objectives import PolicyObjective

    # lr so small that the first step leaves the weights (and so the logprobs) as they were.
    cfg = LearnerConfig(num_ranks=2, zero_stage=request.param, micro_batch_size=2, grad_accum=2, lr=1e-12,
                        lr_schedule="constant")
    group = LearnerGroup(ModelConfig(path="tiny:tiny"), cfg, PolicyObjective(**OPTIONS), 4, 0, "cpu",
                         runtime_env={"env_vars": worker_env_vars("cpu")}, name=f"policy-z{request.param}")
    yield group
    group.shutdown()


def current_logprobs(learners, table: pa.Table) -> list[list[float]]:
    by_row = {}
    for part in ray.get(learners.response_logprobs(ray.put(table), table.num_rows)):
        by_row.update(zip(part.column("row").to_pylist(), part.column("values").to_pylist()))
    return [by_row[r] for r in range(table.num_rows)]


def test_policy_step_matches_hand_values(learners, tiny_tokenizer):
    old = current_logprobs(learners, experience(tiny_tokenizer))
    table = experience(tiny_tokenizer, old)
    shards = [[0, 2, 4, 6], [1, 3, 5, 7]]
    metrics = learners.train_step(ray.put(table), shards)
    assert metrics["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # training forward == pi_old forward
    assert metrics["clip_fraction"] == 0.0
    advantages, ref = table.column("advantages").to_pylist(), table.column("ref_logprobs").to_pylist()
    per_seq = [-sum(a) / len(a) + KL_COEF * sum(o - r for o, r in zip(lp, rf)) / len(lp)
               for a, lp, rf in zip(advantages, old, ref)]
    assert metrics["loss"] == pytest.approx(sum(per_seq) / len(per_seq), abs=1e-5)
    tokens = sum(len(a) for a in advantages)
    kl_tokens = sum(o - r for lp, rf in zip(old, ref) for o, r in zip(lp, rf)) / tokens
    assert metrics["kl_loss"] == pytest.approx(kl_tokens, abs=1e-5)  # a token mean, not per sequence

    moved = experience(tiny_tokenizer, [[x - 1.0 for x in row] for row in current_logprobs(learners, table)])
    metrics = learners.train_step(ray.put(moved), shards)
    positive = sum(x > 0 for row in advantages for x in row)
    assert metrics["clip_fraction"] == pytest.approx(positive / tokens) and 0 < metrics["clip_fraction"] <= 1
