"""Loading models and tokenizers: always `from_pretrained(path_or_name)`, so a real model is just a name."""

from __future__ import annotations

from typing import Any

import torch

from rlhf_ray.config import ModelConfig
from rlhf_ray.models.tiny import resolve_model_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """`auto` -> cuda when this process sees a GPU, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_bf16_features() -> dict[str, bool]:
    """Which native bf16 paths this CPU has (oneDNN uses them for bf16 matmuls)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return {"avx512_bf16": bool(caps.get("avx512_bf16")), "amx_bf16": bool(caps.get("amx_bf16"))}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` -> float32 on CPU (bf16 matmuls are 3-8x slower on AVX2 CPUs), bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.tokenizer or cfg.path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        # Many base models ship no pad token; padding positions are masked, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _config_without_dropout(cfg: ModelConfig, head: bool = False, **overrides: Any) -> Any:
    """The model's config with every attribute named *dropout* (sub-configs too) set to 0.0.

    RL needs it: with dropout on, the learner's log-probabilities (and a critic's values) are random draws,
    not those of the policy that sampled, so the PPO ratio is not 1 even on fresh data. A classification head
    (`head`) gets `classifier_dropout = 0.0` explicitly: transformers' generic token/sequence heads fall back
    to `Dropout(0.1)` when the config has none (Qwen2's has none).
    """
    from transformers import AutoConfig, PretrainedConfig

    config = AutoConfig.from_pretrained(resolve_model_path(cfg.path), trust_remote_code=cfg.trust_remote_code,
                                        **overrides)
    pending = [config]
    while pending:
        current = pending.pop()
        for key, value in list(vars(current).items()):
            if isinstance(value, PretrainedConfig):
                pending.append(value)
            elif "dropout" in key.lower() and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(current, key, 0.0)
    if head:
        config.classifier_dropout = 0.0
    return config


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout module's probability set to 0 (those a model hard-codes, whatever its config says)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype) -> Any:
    """A causal LM with dropout off (`_config_without_dropout`), as every role that loads one trains or scores."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.path), config=_config_without_dropout(cfg),
                                                 dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_reward_model(cfg: ModelConfig, dtype: torch.dtype, pad_token_id: int) -> Any:
    """A sequence scorer with one output: the backbone of `cfg.path` plus a linear head on the last token.

    `AutoModelForSequenceClassification` (not a custom value head) so the saved reward model is a standard
    Hugging Face checkpoint that any tool loads. It scores the last non-pad token, found through
    `pad_token_id`, which must therefore be set. Dropout is off (`_config_without_dropout`).
    """
    from transformers import AutoModelForSequenceClassification

    config = _config_without_dropout(cfg, head=True, num_labels=1, pad_token_id=pad_token_id)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(cfg.path), config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def load_value_model(cfg: ModelConfig, dtype: torch.dtype) -> Any:
    """A per-token scorer with one output (the PPO critic), `AutoModelForTokenClassification`.

    Started from a reward model its backbone and `score` head carry over (a fresh bias is added); from a
    causal LM only the backbone does. Dropout is off (`_config_without_dropout`).
    """
    from transformers import AutoModelForTokenClassification

    config = _config_without_dropout(cfg, head=True, num_labels=1)
    model = AutoModelForTokenClassification.from_pretrained(
        resolve_model_path(cfg.path), config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model
