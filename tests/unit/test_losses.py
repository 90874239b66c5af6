"""Losses on hand-computed tensors, and the invariant that makes them shardable: sums over parts add up."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.algorithms.losses import next_token_logprobs, sft_loss, token_logprobs

LOG3 = math.log(3.0)

# V = 2. Row t of the logits is the model's prediction after reading token t. Their log-softmax values are
# known: [0, log 3] -> log [1/4, 3/4]; [log 3, 0] -> log [3/4, 1/4]; [0, 0] -> log [1/2, 1/2].
LOGITS = torch.tensor([[[0.0, LOG3], [LOG3, 0.0], [0.0, 0.0], [0.0, math.log(7.0)]]])  # [1, 4, 2]
IDS = torch.tensor([[1, 1, 1, 0]])                                                   # [1, 4]
# log p(ids[t] | ids[:t]) for t = 1, 2, 3: from rows 0, 1, 2 of the logits.
NEXT = torch.log(torch.tensor([[3 / 4, 1 / 4, 1 / 2]]))


def test_token_logprobs_gathers_log_softmax_at_the_targets():
    got = token_logprobs(LOGITS, torch.tensor([[0, 1, 0, 1]]))
    expected = torch.log(torch.tensor([[1 / 4, 1 / 4, 1 / 2, 7 / 8]]))
    torch.testing.assert_close(got, expected)


def test_token_logprobs_is_float32_for_low_precision_logits():
    for dtype in (torch.bfloat16, torch.float16):
        out = token_logprobs(LOGITS.to(dtype), IDS)
        assert out.dtype == torch.float32 and out.shape == (1, 4)


def test_token_logprobs_is_invariant_to_a_constant_shift_of_the_logits():
    torch.testing.assert_close(token_logprobs(LOGITS + 100.0, IDS), token_logprobs(LOGITS, IDS))


def test_next_token_logprobs_scores_token_t_with_row_t_minus_1():
    got = next_token_logprobs(LOGITS, IDS)
    assert got.shape == (1, 3)
    torch.testing.assert_close(got, NEXT)


def test_next_token_logprobs_ignores_the_last_row_of_logits():
    changed = LOGITS.clone()
    changed[0, -1] = torch.tensor([5.0, -5.0])
    torch.testing.assert_close(next_token_logprobs(changed, IDS), NEXT)


def test_next_token_logprobs_ignores_the_first_token():
    ids = IDS.clone()
    ids[0, 0] = 0  # the first token is never predicted (and the logits do not depend on it here)
    torch.testing.assert_close(next_token_logprobs(LOGITS, ids), NEXT)


def test_sft_loss_counts_response_tokens_only():
    # tokens 0, 1 are the prompt, 2, 3 the response: NLL = -log(1/4) - log(1/2) = log 8
    loss_sum, count = sft_loss(LOGITS, IDS, torch.tensor([[0, 0, 1, 1]]))
    torch.testing.assert_close(loss_sum, torch.tensor(math.log(8.0)))
    assert count.item() == 2


def test_sft_loss_mask_on_the_first_token_is_ignored():
    # token 0 has nothing before it, so it cannot carry loss even if the mask says so
    loss_sum, count = sft_loss(LOGITS, IDS, torch.tensor([[1, 0, 0, 1]]))
    torch.testing.assert_close(loss_sum, torch.tensor(math.log(2.0)))
    assert count.item() == 1


def test_sft_loss_excludes_prompt_and_padding_in_a_padded_batch():
    pad = 0
    logits = torch.cat([LOGITS, torch.tensor([[[LOG3, 0.0], [0.0, LOG3], [9.0, -9.0], [9.0, -9.0]]])])
    ids = torch.tensor([[1, 1, 1, 0],
                        [0, 0, 1, pad]])  # row 1: prompt [0], response [0, 1], one pad
    mask = torch.tensor([[0, 0, 1, 1],
                         [0, 1, 1, 0]])
    # row 0: log 8 as above; row 1: -log p(0 | row 0 = 3/4) - log p(1 | row 1 = 3/4) = 2 log(4/3)
    loss_sum, count = sft_loss(logits, ids, mask)
    torch.testing.assert_close(loss_sum, torch.tensor(math.log(8.0) + 2 * math.log(4 / 3)))
    assert count.item() == 4


def test_sft_loss_with_an_empty_mask_is_zero_with_zero_count():
    loss_sum, count = sft_loss(LOGITS, IDS, torch.zeros(1, 4))
    assert loss_sum.item() == 0.0 and count.item() == 0.0


def test_sft_loss_gradient_reaches_only_rows_that_predict_response_tokens():
    logits = torch.randn(2, 6, 5, requires_grad=True)
    ids = torch.randint(0, 5, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 0, 0],
                         [0, 1, 0, 0, 0, 1]])
    loss_sum, _ = sft_loss(logits, ids, mask)
    loss_sum.backward()
    touched = logits.grad.abs().sum(-1) > 0
    # row t of the logits predicts token t + 1
    expected = torch.tensor([[0, 1, 1, 0, 0, 0],
                             [1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(touched, expected)


def test_sft_loss_matches_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    ids = torch.randint(0, 11, (3, 7))
    mask = (torch.rand(3, 7) > 0.4).float()
    loss_sum, count = sft_loss(logits, ids, mask)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), targets.reshape(-1), ignore_index=-100,
                                reduction="sum")
    torch.testing.assert_close(loss_sum, reference)
    assert count.item() == mask[:, 1:].sum().item()


# -- the sharding invariant --------------------------------------------------------------------------------

def _batch(seed: int, batch: int = 8, width: int = 9, vocab: int = 13):
    """Rows of different lengths, right-padded: prompt (mask 0), response (mask 1), padding (mask 0).
    Logits on padding are garbage, as a model's would be."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, width, vocab, generator=gen) * 3
    ids = torch.randint(1, vocab, (batch, width), generator=gen)
    mask = torch.zeros(batch, width)
    lengths = []
    for b in range(batch):
        length = int(torch.randint(2, width + 1, (1,), generator=gen))
        prompt = int(torch.randint(1, length, (1,), generator=gen))
        ids[b, length:] = 0
        mask[b, prompt:length] = 1
        lengths.append(length)
    return logits, ids, mask, lengths


SPLITS = [
    [[0, 1, 2, 3, 4, 5, 6, 7]],
    [[0], [1], [2], [3], [4], [5], [6], [7]],
    [[0, 1, 2, 3], [4, 5, 6, 7]],
    [[7, 2], [0, 5, 3], [6], [1, 4]],
    [[3, 1, 6, 0, 2], [5, 7, 4]],
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("parts", SPLITS, ids=lambda s: "/".join(str(len(p)) for p in s))
def test_loss_summed_over_any_split_equals_the_whole_batch(seed, parts):
    """Ranks x micro-batches: each part is padded only to its own longest row (as collate does), its sum and
    count are added up, and the total divided by the total count is the loss of the whole batch."""
    logits, ids, mask, lengths = _batch(seed)
    whole_sum, whole_count = sft_loss(logits, ids, mask)
    total_sum = torch.zeros((), dtype=torch.float64)
    total_count = 0.0
    for rows in parts:
        width = max(lengths[r] for r in rows)
        index = torch.tensor(rows)
        part_sum, part_count = sft_loss(logits[index, :width], ids[index, :width], mask[index, :width])
        total_sum += part_sum.double()
        total_count += part_count.item()
    assert total_count == whole_count.item()
    torch.testing.assert_close(total_sum / total_count, (whole_sum / whole_count).double(),
                               rtol=1e-6, atol=1e-6)


def test_mean_of_part_means_is_not_the_loss():
    """Why losses return sums: averaging per-part means weights short parts too much."""
    logits, ids, mask, _ = _batch(3)
    whole_sum, whole_count = sft_loss(logits, ids, mask)
    means = []
    for rows in ([0], [1, 2, 3, 4, 5, 6, 7]):
        s, c = sft_loss(logits[rows], ids[rows], mask[rows])
        means.append((s / c).item())
    assert abs(sum(means) / 2 - (whole_sum / whole_count).item()) > 1e-3
