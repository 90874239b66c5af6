"""DeepSpeed engine construction from `LearnerConfig`, and ZeRO-aware access to full parameters."""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch

from rlhf_ray.config import LearnerConfig


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


def iter_full_parameters(model: torch.nn.Module, zero_stage: int, rank: int,
                         bucket_bytes: int = 64 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, full tensor on CPU)` for every parameter; on rank 0 only under ZeRO-3.

    Under ZeRO-3 this is a collective: every rank must iterate it to the end. Parameters are gathered in
    buckets of about `bucket_bytes` (one `GatheredParameters` call each, never one per tensor).
    """
    named = list(model.named_parameters())
    if zero_stage < 3:
        for name, param in named:
            yield name, param.detach().to("cpu", copy=True)
        return
    import deepspeed

    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for index, (name, param) in enumerate(named):
        bucket.append((name, param))
        size += param.ds_numel * param.element_size()
        if size >= bucket_bytes or index == len(named) - 1:
            with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
                if rank == 0:
                    gathered = [(n, p.detach().to("cpu", copy=True)) for n, p in bucket]
                else:
                    gathered = []
            yield from gathered
            bucket, size = [], 0
