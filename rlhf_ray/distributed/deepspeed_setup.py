"""DeepSpeed engine construction from `LearnerConfig`, and ZeRO-aware access to full parameters."""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch

from rlhf_ray.config import LearnerConfig
from rlhf_ray.distributed.weight_sync import TensorMeta, plan_buckets


def deepspeed_config(cfg: LearnerConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed JSON config for one learner group."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage == 3:
        # Saving and weight sync gather parameters themselves (bucketed), so DeepSpeed need not.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # Torch's AdamW is a "client" optimizer to DeepSpeed; it works under every ZeRO stage.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def optimizer_name(cfg: LearnerConfig) -> str:
    if cfg.optimizer != "auto":
        return cfg.optimizer
    return "cpu_adam" if cfg.offload_optimizer else "adamw"


def build_optimizer(model: torch.nn.Module, cfg: LearnerConfig, device: str) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms (1-D parameters)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitioned params are 1-D placeholders
            (no_decay if len(shape) < 2 else decay).append(param)
    groups = [{"params": params, "weight_decay": wd}
              for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if params]
    betas = (cfg.adam_betas[0], cfg.adam_betas[1])
    name = optimizer_name(cfg)
    if name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=betas, adamw_mode=True)
    if name == "fused_adam":
        from deepspeed.ops.adam import FusedAdam
        return FusedAdam(groups, lr=cfg.lr, betas=betas, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=device == "cuda")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate factor at optimizer step `step`: linear warmup, then constant/linear/cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LearnerConfig,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _raw_metas(model: torch.nn.Module) -> list[TensorMeta]:
    """Every parameter's name, dtype and *full* shape, in `named_parameters` order (a ZeRO-3 partitioned
    parameter reports its full shape through `ds_shape`)."""
    return [TensorMeta(name, str(p.dtype).removeprefix("torch."), tuple(getattr(p, "ds_shape", p.shape)))
            for name, p in model.named_parameters()]


def parameter_metas(model: torch.nn.Module) -> list[TensorMeta]:
    """What `iter_full_parameters` yields, described without gathering: the name, dtype and full shape of
    each tensor, in order. For a model with LoRA adapters (`models.lora`), the base model's tensors."""
    from rlhf_ray.models.lora import hf_name, lora_config

    metas = _raw_metas(model)
    if lora_config(model) is None:
        return metas
    return [TensorMeta(renamed, m.dtype, m.shape) for m in metas if (renamed := hf_name(m.name)) is not None]


def parameter_buckets(model: torch.nn.Module, bucket_bytes: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The parameters grouped exactly as `plan_buckets(parameter_metas(model), bucket_bytes)` groups them (full
    sizes; at most `bucket_bytes` a bucket unless one tensor is larger), so a weight sync's gathers and its
    broadcast buckets coincide (with LoRA adapters they are grouped by the module's own parameters, which the
    merge then maps onto the plan)."""
    params = dict(model.named_parameters())
    return [[(meta.name, params[meta.name]) for meta in bucket]
            for bucket in plan_buckets(_raw_metas(model), bucket_bytes)]


def iter_full_parameters(model: torch.nn.Module, zero_stage: int, rank: int, bucket_bytes: int = 64 << 20,
                         device: str | torch.device = "cpu", merged: bool = True
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, full tensor on device)` for every parameter on rank 0; other ranks get nothing.

    ZeRO 0-2: every rank holds the full parameters, so ranks other than 0 return at once (no copy), and rank 0
    yields the live parameters themselves where they already are on `device` (read them before the next
    update; never modify them). ZeRO-3: a collective, every rank must iterate to the end; the parameters are
    gathered in the buckets of `parameter_buckets(model, bucket_bytes)` (one `GatheredParameters` call each,
    never one per tensor) and rank 0 copies each bucket to `device` before it is released.

    A model with LoRA adapters yields the base model's names and merged weights (`models.lora.merge_lora`;
    new tensors, the module is untouched) unless `merged=False`, which yields the module's own parameters.
    """
    from rlhf_ray.models.lora import lora_config, lora_scaling, merge_lora

    raw = _iter_raw_parameters(model, zero_stage, rank, bucket_bytes, device)
    if merged and lora_config(model) is not None:
        yield from merge_lora(raw, lora_scaling(model))
    else:
        yield from raw


def _iter_raw_parameters(model: torch.nn.Module, zero_stage: int, rank: int, bucket_bytes: int,
                         device: str | torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    if zero_stage < 3:
        if rank == 0:
            for name, param in model.named_parameters():
                yield name, param.detach().to(device)
        return
    import deepspeed

    for bucket in parameter_buckets(model, bucket_bytes):
        with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
            gathered = [(n, p.detach().to(device, copy=True)) for n, p in bucket] if rank == 0 else []
        yield from gathered


def lora_adapter(model: torch.nn.Module, zero_stage: int, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """Rank 0: the full adapter tensors of a model with LoRA adapters, under peft's file names
    (`models.lora.adapter_state`); None on other ranks and for a model without adapters. ZeRO-3: a collective
    (every rank calls it), which gathers the adapter and trained-head parameters only."""
    from rlhf_ray.models.lora import adapter_state, lora_config

    if lora_config(model) is None:
        return None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if zero_stage < 3:
        return adapter_state(named) if rank == 0 else None
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        state = adapter_state(named) if rank == 0 else None  # adapter_state copies to CPU
    return state
