"""Arrow rollout tables through the real object store: round trip, ragged and empty responses."""

from __future__ import annotations

import pyarrow as pa

from rlhf_ray.rollout.schema import ROLLOUT_SCHEMA, response_mask, response_tensor


def rollouts() -> pa.Table:
    responses = [[5, 6, 7, 2], [], [9], list(range(3, 40))]
    return pa.Table.from_pydict({
        "prompt_index": [0, 0, 1, 1], "sample_index": [0, 1, 0, 1], "group": [0, 0, 1, 1],
        "prompt_ids": [[4, 8], [4, 8], [4, 9, 9], [4, 9, 9]], "response_ids": responses,
        "rollout_logprobs": [[-0.5] * len(r) for r in responses],
        "finish_reason": ["stop", "stop", "stop", "length"], "prompt_text": ["a", "a", "b", "b"],
        "response_text": ["x", "", "y", "z"], "metadata": ["{}"] * 4,
        "prompt_messages": [[{"role": "user", "content": p}] for p in "aabb"],
    }, schema=ROLLOUT_SCHEMA)


def test_rollouts_round_trip_through_the_object_store(ray_cluster):
    import ray

    table = rollouts()
    ref = ray.put(table)
    assert ray.get(ref).equals(table)

    @ray.remote(num_cpus=0)
    def consume(t: pa.Table) -> tuple[list[int], list[float]]:
        # the consumer builds its own tensors from the ragged list columns
        mask = response_mask(t.column("response_ids").to_pylist())
        logprobs = response_tensor(t.column("rollout_logprobs").to_pylist())
        return mask.sum(-1).tolist(), (logprobs * mask).sum(-1).tolist()

    lengths, sums = ray.get(consume.remote(ref))
    assert lengths == [4, 0, 1, 37]
    assert sums == [-2.0, 0.0, -0.5, -18.5]
