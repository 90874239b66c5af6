"""The stages as Python functions: `from rlhf_ray import sft, reward_model, dpo, rlhf, pipeline`.

Each takes the stage's config, either as its dataclass (`rlhf_ray.config.SFTConfig`, ...) or as the path of a
YAML file like `configs/tiny-cpu/sft.yaml`, plus optional overrides: a list of `key=value` strings, exactly as
on the command line (`["run.max_steps=20"]`), or a dict of dotted keys to values (`{"run.max_steps": 20}`).
Overrides apply on top of either form and are validated like the YAML. Each returns what the stage produced
(`StageResult`: run directory, model directory, final metrics; `pipeline`: one per stage, by name).

Stages load torch, Ray, DeepSpeed and vLLM when they run, not when `rlhf_ray` is imported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib import import_module
from typing import Any, Union

Overrides = Union[Sequence[str], Mapping[str, Any], None]

# Public function -> (config class, runner), both as import paths so that importing this module stays free.
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("rlhf_ray.config:SFTConfig", "rlhf_ray.stages.sft:run_sft"),
    "reward_model": ("rlhf_ray.config:RMConfig", "rlhf_ray.stages.rm:run_rm"),
    "dpo": ("rlhf_ray.config:DPOConfig", "rlhf_ray.stages.dpo:run_dpo"),
    "rlhf": ("rlhf_ray.config:RLHFConfig", "rlhf_ray.stages.rlhf:run_rlhf"),
    "pipeline": ("rlhf_ray.config:PipelineConfig", "rlhf_ray.stages.pipeline:run_pipeline"),
}


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(import_module(module), name)


def _override_strings(stage: str, overrides: Overrides) -> list[str]:
    """`overrides` as `key=value` strings (dict values written as JSON, which the YAML reader takes as is)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value, default=str)}" for key, value in overrides.items()]
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence) \
            or not all(isinstance(item, str) for item in overrides):
        raise TypeError(f"rlhf_ray.{stage}: overrides must be a list of 'key=value' strings or a dict of dotted "
                        f"keys to values, got {overrides!r}")
    return list(overrides)


def resolve_config(stage: str, config: Any, overrides: Overrides = None) -> Any:
    """The validated config dataclass of `stage` from a dataclass or a YAML path, with `overrides` applied."""
    from rlhf_ray.config_loader import load_config, to_dict

    cls = _load(STAGES[stage][0])
    extra = _override_strings(stage, overrides)
    if isinstance(config, cls):
        if not extra:
            return config
        # Every section of the given config as one override, then the caller's: one validation for both.
        sections = [f"{key}={json.dumps(value)}" for key, value in to_dict(config).items()]
        return load_config(cls, None, sections + extra)
    if isinstance(config, (str, os.PathLike)):
        return load_config(cls, config, extra)
    raise TypeError(f"rlhf_ray.{stage}: config must be a {cls.__name__} (rlhf_ray.config) or the path of a YAML "
                    f"file, got {type(config).__name__}")


def _run(stage: str, config: Any, overrides: Overrides) -> Any:
    cfg = resolve_config(stage, config, overrides)
    return _load(STAGES[stage][1])(cfg)


def sft(config: Any, overrides: Overrides = None) -> Any:
    """Supervised fine-tuning (`rlhf-ray sft`): `SFTConfig` or YAML path -> `StageResult`."""
    return _run("sft", config, overrides)


def reward_model(config: Any, overrides: Overrides = None) -> Any:
    """Reward-model training (`rlhf-ray rm`): `RMConfig` or YAML path -> `StageResult`."""
    return _run("reward_model", config, overrides)


def dpo(config: Any, overrides: Overrides = None) -> Any:
    """Direct preference optimisation (`rlhf-ray dpo`): `DPOConfig` or YAML path -> `StageResult`."""
    return _run("dpo", config, overrides)


def rlhf(config: Any, overrides: Overrides = None) -> Any:
    """RLHF (`rlhf-ray rlhf`): `RLHFConfig` or YAML path -> `StageResult`."""
    return _run("rlhf", config, overrides)


def pipeline(config: Any, overrides: Overrides = None) -> dict[str, Any]:
    """SFT -> reward model -> RLHF (or DPO) (`rlhf-ray pipeline`): `PipelineConfig` or YAML path -> the
    `StageResult` of each stage, by stage name."""
    return _run("pipeline", config, overrides)


__all__ = ["dpo", "pipeline", "resolve_config", "reward_model", "rlhf", "sft"]
