"""Padded batches of ragged sequences, and reductions over their real tokens.

`mask` is a 0/1 indicator of the same shape as `x` (1 on real response tokens, 0 on padding); any nonzero
entry counts as real. Padded positions are *selected away* (`torch.where`), not multiplied by 0, so garbage
there (inf, NaN, huge logits of a pad token) never leaks into a result or a gradient.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, left: bool = False,
                  dtype: torch.dtype = torch.long) -> Tensor:
    """[B, max_len] tensor of `sequences`, padded right (or left, for generation prompts).

    Args:
        sequences: B sequences of lengths T_i (values of any number type `dtype` holds).
        pad_value: fills the positions past (right) or before (left) each sequence.
        left: pad on the left, so every sequence ends at the last column.
        dtype: of the result.
    Returns:
        [B, max(1, max_i T_i)]: at least one column (all `pad_value` when every sequence is empty).
    """
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max(width, 1)), pad_value, dtype=dtype)
    for i, seq in enumerate(sequences):
        if len(seq):
            values = torch.as_tensor(list(seq), dtype=dtype)
            if left:
                out[i, width - len(seq):] = values
            else:
                out[i, :len(seq)] = values
    return out


def _keep(x: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the tensor's {tuple(x.shape)}")
    return mask.bool()


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """`x` with every padded position replaced by 0. Done *before* any arithmetic, so non-finite garbage in
    the padding cannot turn into a NaN gradient (`where` passes 0 upstream, and 0 * inf is NaN).

    Args:
        x: [...] values; mask: same shape.
    Returns:
        same shape as `x`.
    """
    return torch.where(_keep(x, mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """`Σ x` over the positions where `mask` is 1.

    Args:
        x: [...] values, e.g. [B, T].
        mask: same shape as `x`.
        dim: dimension to reduce; None reduces everything to a scalar.
    Returns:
        scalar (dim=None) or `x` with `dim` removed, e.g. [B] for dim=1.
    """
    kept = zero_padding(x, mask)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_count(mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of real positions, float32 (exact up to 2**24, and all-reducible with the loss sums).

    Args:
        mask: [...] 0/1.
        dim: as in `masked_sum`.
    Returns:
        scalar or `mask` with `dim` removed.
    """
    real = mask.bool().to(torch.float32)
    return real.sum() if dim is None else real.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """`Σ x / n` over the real positions. Where there are none (n = 0) the mean is 0, not NaN, so an empty
    response cannot poison a metric or a batch statistic.

    Args:
        x: [...] values.
        mask: same shape as `x`.
        dim: as in `masked_sum`.
    Returns:
        scalar or `x` with `dim` removed.
    """
    total = masked_sum(x, mask, dim)
    count = masked_count(mask, dim).to(total.dtype)
    return total / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the real entries of `x`, all of them pooled: `Σ (x - μ)² / (n - 1)` (Bessel) or `/ n`.

    With too few entries to define it (n < 2 unbiased, n < 1 biased) the variance is 0, so whitening such a
    batch returns zeros instead of NaNs.

    Args:
        x: [...] values, e.g. [B, T].
        mask: same shape as `x`.
        unbiased: divide by n - 1 (True) or by n.
    Returns:
        scalar.
    """
    x = zero_padding(x, mask)
    mean = masked_mean(x, mask)
    squares = masked_sum((x - mean) ** 2, mask)
    n = masked_count(mask).to(squares.dtype)
    denom = n - 1 if unbiased else n
    return torch.where(denom > 0, squares / denom.clamp(min=1), torch.zeros_like(squares))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise the real entries of `x` to unit variance: `(x - μ) / sqrt(σ² + eps)`, plus `μ` back again
    when `shift_mean=False` (scale only, as for rewards whose sign matters). μ and σ² (unbiased) are pooled
    over every real entry, as in OpenRLHF / TRL advantage whitening.

    Args:
        x: [B, T] (any shape) values.
        mask: same shape as `x`.
        shift_mean: subtract the mean (True) or keep it.
        eps: added to the variance.
    Returns:
        same shape as `x`; 0 on padded positions.
    """
    x = zero_padding(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)
