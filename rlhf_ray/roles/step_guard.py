"""Skipping a learner update whose loss or gradient is NaN or infinite, on every rank alike (`stages.guards`
counts the skipped steps on the driver).

DeepSpeed's ZeRO 1-3 optimizers and its fp16/bf16 wrappers (those with an `overflow` flag) skip a step whose
gradient norm is not finite themselves, in fp32 too, and count it in `engine.skipped_steps`; a plain torch
optimizer under ZeRO 0 is never checked, so `guarded_step` does it for that one.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch


def deepspeed_checks(engine: Any) -> bool:
    """Whether DeepSpeed's optimizer wrapper skips non-finite steps itself (it has an `overflow` flag)."""
    return hasattr(engine.optimizer, "overflow")


def guarded_step(engine: Any, skip: bool, any_rank: Callable[[float], float]) -> float:
    """The boundary `engine.step()` with a plain torch optimizer (fp32 ZeRO 0): returns the gradient norm
    (before clipping; the gradients are already averaged over ranks) and skips the update when it is not
    finite on any rank (`any_rank`: the maximum over ranks of a value) or when `skip`.

    A skipped step drops the gradients, so AdamW leaves every parameter and moment alone (it passes over
    parameters without one), and leaves the LR schedule where it was, as DeepSpeed does on overflow; it is
    counted in `engine.skipped_steps` as DeepSpeed's own skips are."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                 ) if grads else 0.0
    if not (skip or any_rank(float(not np.isfinite(norm)))):
        engine.step()
        return norm
    for p in engine.module.parameters():
        p.grad = None
    # Clipping would fail on a model without gradients; the scheduler must not advance (restored below).
    config, scheduler = engine._config, engine.lr_scheduler
    clipping, config.gradient_clipping, engine.lr_scheduler = config.gradient_clipping, 0.0, None
    try:
        engine.step()
    finally:
        config.gradient_clipping, engine.lr_scheduler = clipping, scheduler
    engine.skipped_steps += 1
    return norm


def skip_metrics(rank: int, zero_stage: int, skipped: bool, nonfinite_loss: float,
                 grad_norm: Optional[float]) -> dict[str, float]:
    """`skipped` (1: the update was not applied), `nonfinite/loss` (micro-batch losses, all ranks) and
    `nonfinite/grad_norm` (1 or 0). A non-finite step that was *not* skipped is an error: the weights took it
    in (e.g. bf16 with DeepSpeed's bf16.check_grad_overflow turned off)."""
    bad_norm = grad_norm is not None and not np.isfinite(float(grad_norm))
    if (nonfinite_loss or bad_norm) and not skipped:
        raise RuntimeError(f"learner rank {rank}: DeepSpeed applied an update with a non-finite loss or gradient "
                           f"norm ({grad_norm}) under learner.zero_stage={zero_stage}; the weights are no longer "
                           "finite (keep DeepSpeed's bf16.check_grad_overflow on)")
    return {"skipped": float(skipped), "nonfinite/loss": nonfinite_loss, "nonfinite/grad_norm": float(bad_norm)}
