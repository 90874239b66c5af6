"""The Python API's argument handling (`rlhf_ray.sft(...)` etc.): config forms, overrides, errors. No stage runs:
`resolve_config` is what every stage function calls before it starts the stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import rlhf_ray
from rlhf_ray.api import resolve_config
from rlhf_ray.config import PipelineConfig, RLHFConfig, RMConfig, SFTConfig
from rlhf_ray.config_loader import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu"


def test_yaml_path_with_a_list_of_overrides():
    cfg = resolve_config("sft", CONFIGS / "sft.yaml", ["run.max_steps=7", "learner.lr=1e-4"])
    assert isinstance(cfg, SFTConfig)
    assert (cfg.run.max_steps, cfg.learner.lr) == (7, 1e-4)
    assert cfg.learner.zero_stage == 2  # the rest comes from the YAML


def test_yaml_path_as_str_with_a_dict_of_overrides():
    cfg = resolve_config("rlhf", str(CONFIGS / "rlhf.yaml"),
                         {"run.max_steps": 3, "generator.temperature": 0.5, "run.output_dir": Path("/tmp/x")})
    assert isinstance(cfg, RLHFConfig)
    assert (cfg.run.max_steps, cfg.generator.temperature, cfg.run.output_dir) == (3, 0.5, "/tmp/x")


def test_a_dataclass_is_used_as_is_and_overrides_apply_on_top():
    cfg = load_config(RMConfig, CONFIGS / "rm.yaml", ["run.name=mine"])
    assert resolve_config("reward_model", cfg) is cfg
    changed = resolve_config("reward_model", cfg, {"run.max_steps": 2, "run.log_level": "debug"})
    assert (changed.run.max_steps, changed.run.log_level, changed.run.name) == (2, "debug", "mine")
    assert changed.learner == cfg.learner and changed.data == cfg.data
    assert cfg.run.max_steps != 2  # the caller's config is not touched


def test_the_pipeline_takes_its_own_config():
    cfg = resolve_config("pipeline", CONFIGS / "pipeline.yaml", ["sft.run.max_steps=4"])
    assert isinstance(cfg, PipelineConfig) and cfg.sft.run.max_steps == 4


@pytest.mark.parametrize("stage, config, message", [
    ("sft", 42, "config must be a SFTConfig (rlhf_ray.config) or the path of a YAML file, got int"),
    ("sft", {"run": {}}, "got dict"),
    ("rlhf", None, "got NoneType"),
])
def test_a_config_of_the_wrong_type_is_refused_by_name(stage, config, message):
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        getattr(rlhf_ray, stage)(config)


def test_another_stage_s_dataclass_is_refused():
    cfg = load_config(RMConfig, CONFIGS / "rm.yaml")
    with pytest.raises(TypeError, match="rlhf_ray.sft: config must be a SFTConfig .* got RMConfig"):
        rlhf_ray.sft(cfg)


@pytest.mark.parametrize("overrides", ["run.max_steps=3", [3], 3])
def test_overrides_of_the_wrong_type_are_refused(overrides):
    with pytest.raises(TypeError, match="overrides must be a list of 'key=value' strings or a dict"):
        rlhf_ray.sft(CONFIGS / "sft.yaml", overrides)


def test_a_bad_override_names_the_key_and_the_file():
    with pytest.raises(ConfigError, match=r"unknown config key run\.max_step.*sft\.yaml"):
        rlhf_ray.sft(CONFIGS / "sft.yaml", ["run.max_step=3"])
    with pytest.raises(ConfigError, match=r"run\.log_level: expected one of 'info', 'debug', got 'loud'"):
        rlhf_ray.sft(CONFIGS / "sft.yaml", {"run.log_level": "loud"})


def test_a_missing_yaml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        rlhf_ray.rlhf(tmp_path / "nope.yaml")


def test_importing_the_package_loads_no_heavy_library():
    code = ("import sys, rlhf_ray; from rlhf_ray import sft, reward_model, dpo, rlhf, pipeline; "
            "print(sorted(m for m in ('torch', 'ray', 'vllm', 'deepspeed', 'transformers', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
