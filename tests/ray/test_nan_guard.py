"""A non-finite loss skips the optimizer step on every rank (real learner groups: ZeRO-2 over 2 ranks, where the
NaN is on rank 1's rows only, and ZeRO-0 on one rank, which DeepSpeed itself never checks in fp32).

Invariants: the skipped step reports itself (`skipped`, `nonfinite/loss`, `nonfinite/grad_norm`) and leaves
the parameters bit for bit as they were and the LR schedule where it was (warmup: the next step's learning
rate is the first step's); the next finite step trains from there, and its parameters are finite, so neither
the parameters nor the Adam moments took in the NaN.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import ray
import torch

from rlhf_ray.config import LearnerConfig, ModelConfig

LR, WARMUP = 1e-3, 4
SHARDS = {2: [[0, 2, 4, 6], [1, 3, 5, 7]], 1: [list(range(8))]}


def experience(tokenizer, poison: dict[int, float]) -> pa.Table:
    """Eight rows; row r's advantages are all `poison[r]` where given."""
    gen = torch.Generator().manual_seed(3)
    prompts = [tokenizer(f"<|user|>word {i}<|end|><|assistant|>", add_special_tokens=False).input_ids
               for i in range(8)]
    lengths = [2, 3, 1, 4, 2, 3, 2, 1]
    responses = [torch.randint(10, 200, (n,), generator=gen).tolist() for n in lengths]
    advantages = [[poison[i]] * n if i in poison else torch.randn(n, generator=gen).tolist()
                  for i, n in enumerate(lengths)]
    floats, ids = pa.list_(pa.float32()), pa.list_(pa.int32())
    return pa.table({"prompt_ids": pa.array(prompts, ids), "response_ids": pa.array(responses, ids),
                     "old_logprobs": pa.array([[-1.0] * n for n in lengths], floats),
                     "advantages": pa.array(advantages, floats),
                     "ref_logprobs": pa.array([[-1.0] * n for n in lengths], floats),
                     "kl_coef": pa.array([0.0] * len(lengths), pa.float64())})


@pytest.fixture(scope="module", params=[(2, 2, math.nan), (0, 1, math.inf)], ids=["zero2-2ranks", "zero0-1rank"])
def case(request, ray_cluster, tiny_model_path):
    from rlhf_ray.distributed.runtime import worker_env_vars
    from rlhf_ray.roles.learner import LearnerGroup
    from rlhf_ray.roles.objectives import PolicyObjective

    stage, ranks, bad = request.param
    cfg = LearnerConfig(num_ranks=ranks, zero_stage=stage, micro_batch_size=2, grad_accum=4 // ranks, lr=LR,
                        lr_schedule="constant", warmup_steps=WARMUP, max_grad_norm=1.0)
    group = LearnerGroup(ModelConfig(path="tiny:tiny"), cfg, PolicyObjective(), 10, 0, "cpu",
                         runtime_env={"env_vars": worker_env_vars("cpu")}, name=f"nan-guard-z{stage}")
    yield group, ranks, bad
    group.shutdown()


def test_a_non_finite_step_is_skipped_everywhere_and_the_next_one_trains(case, tiny_tokenizer):
    group, ranks, bad = case
    shards = SHARDS[ranks]
    before = group.parameter_checksum()
    poisoned = experience(tiny_tokenizer, {shards[-1][1]: bad})  # one row of the last rank's shard only
    metrics = group.train_step(ray.put(poisoned), shards)
    assert metrics["skipped"] == 1.0
    assert metrics["nonfinite/loss"] >= 1.0 and metrics["nonfinite/grad_norm"] == 1.0
    assert not math.isfinite(metrics["grad_norm"])
    assert metrics["lr"] == pytest.approx(LR / WARMUP)  # warmup step 0's rate, not advanced
    assert group.parameter_checksum() == before

    metrics = group.train_step(ray.put(experience(tiny_tokenizer, {})), shards)
    assert metrics["skipped"] == 0.0 and metrics["nonfinite/loss"] == 0.0 and metrics["nonfinite/grad_norm"] == 0.0
    assert math.isfinite(metrics["loss"]) and 0.0 < metrics["grad_norm"] < math.inf
    assert metrics["lr"] == pytest.approx(2 * LR / WARMUP)  # the schedule's first real step
    after = group.parameter_checksum()
    assert after != before and math.isfinite(after)
