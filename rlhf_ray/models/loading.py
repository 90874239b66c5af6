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


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.path), dtype=dtype,
                                                 trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_reward_model(cfg: ModelConfig, dtype: torch.dtype, pad_token_id: int) -> Any:
    """A sequence scorer with one output: the backbone of `cfg.path` plus a linear head on the last token.

    `AutoModelForSequenceClassification` (not a custom value head) so the saved reward model is a standard
    Hugging Face checkpoint that any tool loads. It scores the last non-pad token, found through
    `pad_token_id`, which must therefore be set.
    """
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(cfg.path), num_labels=1, dtype=dtype, pad_token_id=pad_token_id,
        trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def load_value_model(cfg: ModelConfig, dtype: torch.dtype) -> Any:
    """A per-token scorer with one output (the PPO critic), `AutoModelForTokenClassification`.

    Started from a reward model its backbone and `score` head carry over (a fresh bias is added); from a
    causal LM only the backbone does.
    """
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(
        resolve_model_path(cfg.path), num_labels=1, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model
