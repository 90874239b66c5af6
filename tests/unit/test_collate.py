"""Arrow rows -> padded tensors: right padding for training, left padding for prompts, a dummy for no rows."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from rlhf_ray.algorithms.losses import sft_loss
from rlhf_ray.data.collate import TokenBatch, collate_sft, pad_sequences

PAD = 9


def table(rows: list[tuple[list[int], list[int]]]) -> pa.Table:
    return pa.table({"input_ids": pa.array([r[0] for r in rows], pa.list_(pa.int32())),
                     "loss_mask": pa.array([r[1] for r in rows], pa.list_(pa.int8()))})


ROWS = [([1, 2, 3], [0, 1, 1]),
        ([4, 5], [0, 1]),
        ([6, 7, 8, 1, 2], [0, 0, 1, 1, 1])]


def test_pad_right():
    out = pad_sequences([[1, 2, 3], [4], []], PAD)
    assert torch.equal(out, torch.tensor([[1, 2, 3], [4, PAD, PAD], [PAD, PAD, PAD]]))
    assert out.dtype == torch.long


def test_pad_left():
    out = pad_sequences([[1, 2, 3], [4], []], PAD, left=True)
    assert torch.equal(out, torch.tensor([[1, 2, 3], [PAD, PAD, 4], [PAD, PAD, PAD]]))


def test_pad_with_dtype_and_tuples():
    out = pad_sequences(((1, 0), (1,)), 0, dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_pad_of_equal_lengths_is_a_plain_stack():
    for left in (False, True):
        assert torch.equal(pad_sequences([[1, 2], [3, 4]], PAD, left=left), torch.tensor([[1, 2], [3, 4]]))


def test_pad_of_nothing_keeps_one_column():
    assert pad_sequences([], PAD).shape == (0, 1)
    assert torch.equal(pad_sequences([[], []], PAD), torch.full((2, 1), PAD))


def test_collate_sft_right_pads_the_chosen_rows_in_order():
    batch = collate_sft(table(ROWS), [2, 0], PAD)
    assert torch.equal(batch.input_ids, torch.tensor([[6, 7, 8, 1, 2], [1, 2, 3, PAD, PAD]]))
    assert torch.equal(batch.attention_mask, torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert torch.equal(batch.loss_mask, torch.tensor([[0.0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]))
    assert batch.input_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.long
    assert batch.loss_mask.dtype == torch.float32


def test_collate_sft_width_is_the_longest_chosen_row():
    batch = collate_sft(table(ROWS), (1, 0), PAD)
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.loss_mask.shape == (2, 3)


def test_collate_sft_padding_carries_no_loss_and_no_attention():
    batch = collate_sft(table(ROWS), [0, 1, 2], PAD)
    pad = batch.attention_mask == 0
    assert torch.all(batch.input_ids[pad] == PAD)
    assert torch.all(batch.loss_mask[pad] == 0)
    assert torch.all(batch.attention_mask.sum(1) == torch.tensor([3, 2, 5]))


def test_collate_sft_with_no_rows_is_a_masked_dummy():
    """A rank with nothing to do still runs a forward (ZeRO-3 collectives), on a row with no loss."""
    batch = collate_sft(table(ROWS), [], PAD)
    assert torch.equal(batch.input_ids, torch.full((1, 2), PAD))
    assert batch.input_ids.dtype == torch.long
    assert torch.equal(batch.attention_mask, torch.ones(1, 2, dtype=torch.long))
    assert torch.equal(batch.loss_mask, torch.zeros(1, 2))
    loss_sum, count = sft_loss(torch.randn(1, 2, 10), batch.input_ids, batch.loss_mask)
    assert loss_sum.item() == 0.0 and count.item() == 0.0


def test_token_batch_to_keeps_values():
    batch = collate_sft(table(ROWS), [0], PAD)
    moved = batch.to("cpu")
    assert isinstance(moved, TokenBatch)
    for name in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(getattr(moved, name), getattr(batch, name))


def test_collate_sft_out_of_range_row_fails():
    with pytest.raises((IndexError, pa.ArrowException)):
        collate_sft(table(ROWS), [3], PAD)
