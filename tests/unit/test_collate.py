"""Arrow rows -> padded tensors: right padding for training, left padding for prompts, a dummy for no rows."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from rlhf_ray.algorithms.losses import next_token_logprobs, sft_loss
from rlhf_ray.algorithms.masked import pad_sequences
from rlhf_ray.data.collate import (
    RLBatch,
    TokenBatch,
    collate_rl,
    collate_sft,
)

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


# -- collate_rl ----------------------------------------------------------------------------------------------

RL_PROMPTS = [[1, 2, 3], [4, 5], [6], [7, 8, 1, 2]]
RL_RESPONSES = [[5, 6], [7, 8, 3, 4], [], [2]]


def rl_table() -> pa.Table:
    lists = pa.list_(pa.float32())
    return pa.table({
        "prompt_ids": pa.array(RL_PROMPTS, pa.list_(pa.int32())),
        "response_ids": pa.array(RL_RESPONSES, pa.list_(pa.int32())),
        "advantages": pa.array([[float(10 * i + t + 1) for t in range(len(r))] for i, r in enumerate(RL_RESPONSES)],
                               lists),
        "old_logprobs": pa.array([[-0.5] * len(r) for r in RL_RESPONSES], lists),
    })


def test_collate_rl_sequences_and_masks():
    batch = collate_rl(rl_table(), [1, 2, 0], PAD, ("advantages",))
    assert torch.equal(batch.input_ids, torch.tensor([[4, 5, 7, 8, 3, 4], [6, PAD, PAD, PAD, PAD, PAD],
                                                      [1, 2, 3, 5, 6, PAD]]))
    assert torch.equal(batch.attention_mask, torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0],
                                                           [1, 1, 1, 1, 1, 0]]))
    assert torch.equal(batch.mask, torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]))
    assert batch.mask.dtype == torch.float32 and batch.response_index.dtype == torch.long


def test_collate_rl_fields_are_padded_to_the_response_width():
    batch = collate_rl(rl_table(), [1, 2, 0], PAD, ("advantages", "old_logprobs"))
    assert set(batch.present()) == {"advantages", "old_logprobs"}
    assert torch.equal(batch.advantages, torch.tensor([[11.0, 12, 13, 14], [0, 0, 0, 0], [1, 2, 0, 0]]))
    assert torch.equal(batch.old_logprobs, -0.5 * batch.mask)
    assert collate_rl(rl_table(), [0], PAD).present() == ()


def test_collate_rl_response_index_points_at_the_logits_that_predict_each_response_token():
    rows = [3, 0, 2, 1]
    batch = collate_rl(rl_table(), rows, PAD)
    torch.manual_seed(0)
    logits = torch.randn(*batch.input_ids.shape, 11)
    got = next_token_logprobs(logits, batch.input_ids).gather(1, batch.response_index)
    for b, row in enumerate(rows):
        prompt, response = RL_PROMPTS[row], RL_RESPONSES[row]
        for t, token in enumerate(response):
            # response token t sits at position len(prompt) + t; the logits one position earlier predict it
            want = torch.log_softmax(logits[b, len(prompt) + t - 1], dim=-1)[token]
            assert got[b, t].item() == pytest.approx(want.item(), abs=1e-6)
    assert got.shape == batch.mask.shape


def test_collate_rl_with_no_rows_is_a_masked_dummy():
    batch = collate_rl(rl_table(), [], PAD, ("advantages", "old_logprobs"))
    assert isinstance(batch, RLBatch)
    assert torch.equal(batch.input_ids, torch.full((1, 2), PAD))
    assert torch.equal(batch.mask, torch.zeros(1, 1))
    assert {k: getattr(batch, k).shape for k in batch.present()} == {"advantages": (1, 1), "old_logprobs": (1, 1)}
    gathered = next_token_logprobs(torch.randn(1, 2, 11), batch.input_ids).gather(1, batch.response_index)
    assert gathered.shape == (1, 1)


def test_collate_rl_of_only_empty_responses_keeps_one_column():
    batch = collate_rl(rl_table(), [2], PAD, ("advantages",))
    assert batch.mask.shape == batch.response_index.shape == batch.advantages.shape == (1, 1)
    assert batch.mask.sum() == 0


def test_rl_batch_to_keeps_values():
    batch = collate_rl(rl_table(), [0, 1], PAD, ("advantages",))
    moved = batch.to("cpu")
    assert torch.equal(moved.response_index, batch.response_index)
    assert torch.equal(moved.advantages, batch.advantages)
