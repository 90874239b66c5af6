"""Masked reductions on hand-computed tensors; padding, whatever it holds, never changes a result."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algorithms.masked import masked_count, masked_mean, masked_sum, masked_var, masked_whiten, zero_padding

X = torch.tensor([[1.0, 2.0, 3.0],
                  [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0],
                     [1.0, 0.0, 0.0]])  # real entries: 1, 2, 4
GARBAGE = torch.tensor([[0.0, 0.0, float("inf")],
                        [0.0, float("nan"), -1e30]])


def _with_garbage(x: torch.Tensor) -> torch.Tensor:
    return torch.where(MASK.bool(), x, GARBAGE)


def test_masked_sum():
    assert masked_sum(X, MASK).item() == 7.0
    torch.testing.assert_close(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_sum(X, MASK, dim=0), torch.tensor([5.0, 2.0, 0.0]))


def test_masked_count_is_float32_even_for_integer_masks():
    count = masked_count(MASK.long())
    assert count.dtype == torch.float32 and count.item() == 3.0
    torch.testing.assert_close(masked_count(MASK, dim=1), torch.tensor([2.0, 1.0]))


def test_masked_mean():
    torch.testing.assert_close(masked_mean(X, MASK), torch.tensor(7.0 / 3.0))
    torch.testing.assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 4.0]))


def test_masked_mean_of_nothing_is_zero_not_nan():
    assert masked_mean(X, torch.zeros_like(MASK)).item() == 0.0
    torch.testing.assert_close(masked_mean(X, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), dim=1),
                               torch.tensor([1.0, 0.0]))


def test_masked_var_by_hand():
    # 1, 2, 4: mean 7/3, Σ (x - mean)² = (16 + 1 + 25) / 9 = 42/9
    torch.testing.assert_close(masked_var(X, MASK), torch.tensor(42.0 / 9.0 / 2.0))
    torch.testing.assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(42.0 / 9.0 / 3.0))
    torch.testing.assert_close(masked_var(X, MASK), torch.tensor([1.0, 2.0, 4.0]).var())


def test_masked_var_of_too_few_entries_is_zero():
    one = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    assert masked_var(X, one).item() == 0.0
    assert masked_var(X, one, unbiased=False).item() == 0.0
    assert masked_var(X, torch.zeros_like(MASK), unbiased=False).item() == 0.0


def test_masked_whiten_by_hand():
    std = (7.0 / 3.0) ** 0.5
    expected = torch.tensor([[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0],
                             [(4 - 7 / 3) / std, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(X, MASK), expected)
    white = masked_whiten(X, MASK)
    assert abs(masked_mean(white, MASK).item()) < 1e-6
    torch.testing.assert_close(masked_var(white, MASK), torch.tensor(1.0))


def test_masked_whiten_without_shift_keeps_the_mean():
    std = (7.0 / 3.0) ** 0.5
    expected = torch.tensor([[(1 - 7 / 3) / std + 7 / 3, (2 - 7 / 3) / std + 7 / 3, 0.0],
                             [(4 - 7 / 3) / std + 7 / 3, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(X, MASK, shift_mean=False), expected)


def test_masked_whiten_of_a_constant_is_zero():
    assert torch.count_nonzero(masked_whiten(torch.full((2, 3), 5.0), MASK)) == 0


@pytest.mark.parametrize("fn", [masked_sum, masked_mean, masked_var, masked_whiten])
def test_garbage_in_the_padding_changes_nothing(fn):
    torch.testing.assert_close(fn(_with_garbage(X), MASK), fn(X, MASK))


def test_garbage_in_the_padding_gives_no_nan_gradient():
    x = _with_garbage(X).requires_grad_()
    (masked_whiten(x, MASK).pow(2).sum() + masked_var(x, MASK) + masked_mean(x, MASK)).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~MASK.bool()] == 0).all()


def test_zero_padding():
    torch.testing.assert_close(zero_padding(_with_garbage(X), MASK), X * MASK)


def test_a_mask_of_another_shape_is_an_error():
    with pytest.raises(ValueError, match="mask shape"):
        masked_sum(X, MASK[:, :2])
