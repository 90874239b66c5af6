"""The configuration of every stage: frozen dataclasses, one per part, each field documented once.

Loaded from `configs/*.yaml` plus dotted overrides (`learner.lr=3e-4`) by `rlhf_ray.config_loader`; the
help text here is what `rlhf-ray <stage> --help` prints. Cross-field rules live in `__post_init__`.
"""

from __future__ import annotations

from rlhf_ray.config.base import (
    Device,
    DType,
    EvalConfig,
    LearnerConfig,
    ModelConfig,
    PlacementConfig,
    RunConfig,
)
from rlhf_ray.config.dpo import DPOConfig, DPOLossConfig, DPOReferenceConfig
from rlhf_ray.config.rlhf import (
    AlgorithmConfig,
    CriticConfig,
    GeneratorConfig,
    PipelineConfig,
    PromptDataConfig,
    ReferenceConfig,
    RewardConfig,
    RewardFunctionConfig,
    RLHFConfig,
    SyncConfig,
)
from rlhf_ray.config.supervised import (
    DataConfig,
    RewardDataConfig,
    RewardLossConfig,
    RMConfig,
    SFTConfig,
)

__all__ = [
    "AlgorithmConfig", "CriticConfig", "DataConfig", "Device", "DPOConfig", "DPOLossConfig", "DPOReferenceConfig",
    "DType", "EvalConfig", "GeneratorConfig",
    "LearnerConfig", "ModelConfig", "PipelineConfig", "PlacementConfig", "PromptDataConfig", "ReferenceConfig",
    "RewardConfig", "RewardDataConfig", "RewardFunctionConfig", "RewardLossConfig", "RLHFConfig", "RMConfig",
    "RunConfig", "SFTConfig", "SyncConfig",
]
