"""The GPU presets against the cluster shapes they name, and the GPU-share rule for model-holding scorers.

Each `configs/gpu/*.yaml` names its cluster in a `# cluster:` comment (`N x {GPU: 8, custom_resource: n}`,
comma-separated groups of nodes). The demand is computed from the config itself (the same `GroupSpec`s the
run reserves) and packed onto those nodes: a preset asking for more than its cluster has would wait for
placement forever on the real thing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rlhf_ray.cli import STAGE_CONFIGS
from rlhf_ray.config import (
    PipelineConfig,
    RLHFConfig,
    RMConfig,
    SFTConfig,
)
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.distributed.worker_group import GroupSpec, pack_bundles
from rlhf_ray.stages.rlhf_roles import check_gpu_shares, learner_spec, role_specs

REPO = Path(__file__).resolve().parents[2]
GPU_PRESETS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))


def cluster_shape(path: Path) -> list[dict[str, float]]:
    """The nodes named by the preset's `# cluster:` comment, one resource dict per node."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("# cluster:")]
    assert len(lines) == 1, f"{path.name}: expected one '# cluster: N x {{GPU: 8, ...}}' comment line"
    groups = re.findall(r"(\d+) x (\{[^}]*\})", lines[0])
    assert groups, f"{path.name}: cannot read {lines[0]!r}"
    return [dict(yaml.safe_load(node)) for count, node in groups for _ in range(int(count))]


def stage_demands(path: Path) -> dict[str, list[GroupSpec]]:
    """Per stage of the preset (stages run one after another), the groups it reserves on CUDA."""
    cls = STAGE_CONFIGS[path.stem.split("-")[0]]
    cfg = load_config(cls, path)
    if isinstance(cfg, PipelineConfig):
        stages = {"sft": cfg.sft, "rlhf": cfg.rlhf, **({"rm": cfg.rm} if cfg.rm else {})}
    else:
        stages = {path.stem: cfg}
    out = {}
    for name, stage in stages.items():
        if isinstance(stage, RLHFConfig):
            out[name] = list(role_specs(stage, "cuda").values())
        else:
            assert isinstance(stage, (SFTConfig, RMConfig))
            out[name] = [learner_spec(stage.learner, name, "cuda")]
    return out


def test_every_gpu_preset_is_checked():
    assert {p.name for p in GPU_PRESETS} >= {"pipeline.yaml", "rlhf-2node.yaml", "rlhf-8gpu.yaml", "sft.yaml"}


@pytest.mark.parametrize("path", GPU_PRESETS, ids=lambda p: p.name)
def test_gpu_preset_fits_the_cluster_it_names(path):
    nodes = cluster_shape(path)
    for stage, specs in stage_demands(path).items():
        unplaced = pack_bundles(specs, nodes)
        assert not unplaced, f"{path.name} ({stage}) does not fit {nodes}: {unplaced}"


def test_packing_sees_a_preset_that_asks_too_much():
    """The 2-node preset as it was shipped: 4 engines x 2 GPUs + reward + reference on an 8-GPU rollout node."""
    path = REPO / "configs" / "gpu" / "rlhf-2node.yaml"
    cfg = load_config(RLHFConfig, path, ["generator.num_engines=4"])
    unplaced = pack_bundles(list(role_specs(cfg, "cuda").values()), cluster_shape(path))
    assert unplaced and all("rollout_node" in u for u in unplaced), unplaced


def test_packing_keeps_a_bundle_on_one_node():
    spec = GroupSpec("generator", num_workers=1, cpus_per_worker=1, gpus_per_worker=4)
    assert pack_bundles([spec], [{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}]) == ["generator: 1 CPU, 4 GPU"]
    assert pack_bundles([spec], [{"CPU": 8, "GPU": 4}]) == []


def _rlhf(*overrides: str) -> RLHFConfig:
    return load_config(RLHFConfig, None, ["data.train=x.jsonl", "run.max_steps=1",
                                          "reward.functions=[{path: 'rlhf_ray.rewards.tasks:task_score'}]",
                                          *overrides])


def test_a_model_holding_scorer_needs_a_gpu_share_on_cuda():
    with pytest.raises(ConfigError, match=r"reference\.placement.gpus=0 on a CUDA run"):
        check_gpu_shares(_rlhf(), "cuda")
    check_gpu_shares(_rlhf(), "cpu")  # on CPU nothing is reserved or needed
    check_gpu_shares(_rlhf("reference.placement.gpus=0.25"), "cuda")  # rule rewards hold no model
    with pytest.raises(ConfigError, match=r"reward\.placement.gpus=0 on a CUDA run"):
        check_gpu_shares(_rlhf("reference.placement.gpus=0.25", "reward.model=rm"), "cuda")
    check_gpu_shares(_rlhf("reference.placement.gpus=0.25", "reward.model=rm", "reward.placement.gpus=0.25"),
                     "cuda")


@pytest.mark.parametrize("path", [p for p in GPU_PRESETS if p.stem.startswith(("rlhf", "pipeline"))],
                         ids=lambda p: p.name)
def test_gpu_presets_give_scorers_their_own_gpu_share(path):
    cfg = load_config(STAGE_CONFIGS[path.stem.split("-")[0]], path)
    check_gpu_shares(cfg.rlhf if isinstance(cfg, PipelineConfig) else cfg, "cuda")


def test_an_engine_may_take_a_fraction_of_one_gpu_only_without_tensor_parallelism():
    cfg = _rlhf("generator.placement.gpus=0.5", "reference.placement.gpus=0.1", "learner.placement.gpus=0.4",
                "algorithm.advantage=grpo")  # no critic
    assert role_specs(cfg, "cuda")["generators"].bundles()[0]["GPU"] == 0.5
    assert pack_bundles(list(role_specs(cfg, "cuda").values()), [{"GPU": 1, "CPU": 8}]) == []
    assert _rlhf("generator.tensor_parallel_size=2").generator.engine_gpus == 2.0
    with pytest.raises(ConfigError, match=r"generator\.placement.gpus=0\.5: an engine with tensor_parallel_size=2"):
        _rlhf("generator.tensor_parallel_size=2", "generator.placement.gpus=0.5")


def test_engine_env_vars_reach_the_engine_environment():
    from rlhf_ray.roles.generator import generator_env_vars

    cfg = _rlhf("generator.env_vars={NCCL_SOCKET_IFNAME: eth0, OMP_NUM_THREADS: 3}").generator
    env = generator_env_vars(cfg, "cpu")
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["OMP_NUM_THREADS"] == "3"  # the user's value wins
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_ranks_of_one_deepspeed_job_cannot_share_a_gpu():
    shares = ("reference.placement.gpus=0.25", "algorithm.advantage=grpo")
    with pytest.raises(ConfigError, match=r"learner\.placement.gpus=0\.5 with learner\.num_ranks=2"):
        check_gpu_shares(_rlhf(*shares, "learner.num_ranks=2", "learner.placement.gpus=0.5",
                               "learner.micro_batch_size=4"), "cuda")
    check_gpu_shares(_rlhf(*shares, "learner.num_ranks=1", "learner.placement.gpus=0.5"), "cuda")
    with pytest.raises(ConfigError, match=r"critic\.learner\.placement.gpus=0\.5"):
        check_gpu_shares(_rlhf("reference.placement.gpus=0.25", "critic.learner.num_ranks=2",
                               "critic.learner.placement.gpus=0.5", "critic.learner.micro_batch_size=4"), "cuda")
