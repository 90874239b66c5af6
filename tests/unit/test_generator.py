"""Generator helpers that need neither Ray nor vLLM: row sharding and the actor environment."""

from __future__ import annotations

from rlhf_ray.config import GeneratorConfig, PlacementConfig
from rlhf_ray.distributed.worker_group import shard_rows
from rlhf_ray.roles.generator import generator_env_vars


def test_shard_rows_is_contiguous_balanced_and_complete():
    rows = [7, 3, 9, 1, 4]
    shards = shard_rows(rows, 3)
    assert shards == [[7, 3], [9, 1], [4]]
    assert [r for s in shards for r in s] == rows  # concatenating the shards' tables keeps row order
    assert shard_rows([1], 3) == [[1], [], []]
    assert shard_rows([], 2) == [[], []]


def test_generator_env_vars():
    env = generator_env_vars(GeneratorConfig(in_process=True, placement=PlacementConfig(cpus=2.0)), "cpu")
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["DS_ACCELERATOR"] == "cpu"
    gpu = generator_env_vars(GeneratorConfig(in_process=False), "cuda")
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu and "OMP_NUM_THREADS" not in gpu
