"""Chunked log-probabilities at response positions: equal to the naive full-vocabulary computation, values and
gradients (fp32, 1e-6), at any temperature; and the model glue on the real tiny Qwen2, tied and untied."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlhf_ray.algorithms.logprobs import (
    chunk_rows,
    scatter_positions,
    scoring_temperature,
    select_positions,
    token_logprobs_chunked,
)
from rlhf_ray.models.causal_lm import output_head, response_logprobs

TOL = {"atol": 1e-6, "rtol": 1e-6}  # fp32: chunks change the summation order only
N, H, V = 37, 16, 50


def naive(states, targets, weight, temperature):
    """The plain way: full logits, float32 log-softmax over the vocabulary, gather; and the entropy."""
    logp = torch.log_softmax((states @ weight.T).float() / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def leaves(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(N, H, generator=gen, dtype=torch.float32, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen) / math.sqrt(H))  # logits of order 1
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(2, N, generator=gen)  # an arbitrary loss: weights on logprobs and entropies
    return states, head, targets, upstream


@pytest.mark.parametrize("rows", [1, 5, N, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_chunked_equals_naive_values_and_gradients(rows, temperature):
    states, head, targets, upstream = leaves()
    got_lp, got_ent = token_logprobs_chunked(states, targets, head, temperature, rows, with_entropy=True)
    ((got_lp * upstream[0]).sum() + (got_ent * upstream[1]).sum()).backward()
    got_grads = states.grad.clone(), head.weight.grad.clone()

    states2, head2, _, _ = leaves()
    want_lp, want_ent = naive(states2, targets, head2.weight, temperature)
    ((want_lp * upstream[0]).sum() + (want_ent * upstream[1]).sum()).backward()
    torch.testing.assert_close(got_lp, want_lp, **TOL)
    torch.testing.assert_close(got_ent, want_ent, **TOL)
    torch.testing.assert_close(got_grads[0], states2.grad, **TOL)  # wrt the hidden states
    torch.testing.assert_close(got_grads[1], head2.weight.grad, **TOL)  # wrt the lm_head weight


def test_temperature_changes_the_values():
    """So the tests above can fail: T = 0.7 is not T = 1."""
    states, head, targets, _ = leaves()
    with torch.no_grad():
        hot, _ = token_logprobs_chunked(states, targets, head, 0.7, 8)
        plain, _ = token_logprobs_chunked(states, targets, head, 1.0, 8)
    assert (hot - plain).abs().max() > 0.1


def test_logits_without_a_head_and_no_grad_path():
    states, head, targets, _ = leaves()
    with torch.no_grad():
        logits = head(states)
        got, ent = token_logprobs_chunked(logits, targets, None, 0.7, 4)
        want, _ = naive(states, targets, head.weight, 0.7)
    assert ent is None and not got.requires_grad
    torch.testing.assert_close(got, want, **TOL)


def test_no_position_still_gives_a_graph():
    states, head, targets, _ = leaves()
    lp, ent = token_logprobs_chunked(states[:0], targets[:0], head, 1.0, 4, with_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert torch.count_nonzero(head.weight.grad) == 0 and torch.count_nonzero(states.grad) == 0


def test_banned_tokens_give_finite_entropy():
    logits = torch.tensor([[0.0, 0.0, -math.inf], [3.0, -math.inf, -math.inf]], requires_grad=True)
    lp, ent = token_logprobs_chunked(logits, torch.tensor([0, 0]), None, 1.0, 1, with_entropy=True)
    torch.testing.assert_close(lp, torch.tensor([-math.log(2), 0.0]))
    torch.testing.assert_close(ent, torch.tensor([math.log(2), 0.0]))
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_temperature_rules():
    assert scoring_temperature(0.0) == 1.0 and scoring_temperature(0.7) == 0.7
    assert chunk_rows(152_000, 1 << 25) == 220 and chunk_rows(10, 5) == 1
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs_chunked(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), None, 0.0)


def test_select_and_scatter_round_trip():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    index = torch.tensor([[1, 2, 3], [0, 4, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    picked, where = select_positions(x, index, mask)
    torch.testing.assert_close(picked, torch.stack([x[0, 1], x[0, 2], x[1, 0], x[1, 4]]))
    back = scatter_positions(picked[:, 0], where, mask.shape)
    torch.testing.assert_close(back, torch.tensor([[3.0, 6.0, 0.0], [15.0, 27.0, 0.0]]))


# -- the model glue on the tiny Qwen2 ---------------------------------------------------------------------------

def _batch(vocab: int):
    gen = torch.Generator().manual_seed(1)
    prompts, responses = [5, 3, 7], [4, 0, 6]
    seqs = [torch.randint(3, vocab, (p + r,), generator=gen).tolist() for p, r in zip(prompts, responses)]
    width, length = max(responses), max(len(s) for s in seqs)
    input_ids = torch.zeros(3, length, dtype=torch.long)
    attention = torch.zeros(3, length, dtype=torch.long)
    index = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width)
    for i, (s, p, r) in enumerate(zip(seqs, prompts, responses)):
        input_ids[i, :len(s)], attention[i, :len(s)] = torch.tensor(s), 1
        index[i, :r], mask[i, :r] = torch.arange(p - 1, p - 1 + r), 1.0
    return input_ids, attention, index, mask


def _model_naive(model, input_ids, attention, index, mask, temperature):
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    targets = input_ids.gather(1, index + 1)
    chosen = logp.gather(1, index.unsqueeze(-1).expand(-1, -1, logp.shape[-1])).gather(2, targets.unsqueeze(-1))
    return chosen.squeeze(-1) * mask


@pytest.fixture(scope="module", params=["tied", "untied"])
def lm(request, tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    if request.param == "untied":
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    return model.train()  # dropout is 0 in the tiny config: train() changes nothing here


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_equal_the_model_logits_path(lm, temperature):
    batch = _batch(lm.config.vocab_size)
    lm.zero_grad(set_to_none=True)
    ref = copy.deepcopy(lm)
    got, ent = response_logprobs(lm, *batch, temperature, with_entropy=True, chunk_elements=3 * lm.config.vocab_size)
    assert output_head(lm) is lm.lm_head and ent is not None
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (got * upstream).sum().backward()
    want = _model_naive(ref, *batch, temperature)
    (want * upstream).sum().backward()
    torch.testing.assert_close(got, want, **TOL)
    for (name, p), q in zip(lm.named_parameters(), ref.parameters()):
        # Through two layers fp32 rounding grows a little: 1e-6 relative to the tensor's largest entry.
        scale = max(1.0, q.grad.abs().max().item())
        assert (p.grad - q.grad).abs().max().item() <= 1e-6 * scale, name
    with torch.no_grad():  # the no-grad path runs the backbone alone: same values
        again, _ = response_logprobs(lm, *batch, temperature)
    torch.testing.assert_close(again, got.detach(), **TOL)


def test_scaled_logits_take_the_fallback(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    assert output_head(model) is not None
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits are not lm_head(h)
    assert output_head(model) is None
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        got, _ = response_logprobs(model, *batch, 0.7)
        torch.testing.assert_close(got, _model_naive(model, *batch, 0.7), **TOL)


# -- the reference scorer ----------------------------------------------------------------------------------------

def test_reference_logprobs_at_a_temperature_are_log_softmax_of_logits_over_t(tiny_model_path):
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from rlhf_ray.config import ModelConfig
    from rlhf_ray.roles.scorers import ReferenceActor

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (4, 9, 2)]
    responses = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (5, 1, 0)]
    ids = pa.list_(pa.int32())
    table = pa.table({"prompt_ids": pa.array(prompts, ids), "response_ids": pa.array(responses, ids)})
    actor = ReferenceActor(ModelConfig(path="tiny:tiny"), 2, "cpu", temperature=0.7)
    rows = [2, 0, 1]
    at_07 = actor.logprobs(table, rows).column("values").to_pylist()
    at_1 = actor.logprobs(table, rows, temperature=1.0).column("values").to_pylist()
    for row, hot, plain in zip(rows, at_07, at_1):
        p, r = prompts[row], responses[row]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
        positions, tokens = torch.arange(len(p) - 1, len(p) - 1 + len(r)), torch.tensor(r, dtype=torch.long)
        for temperature, got in ((0.7, hot), (1.0, plain)):
            want = torch.log_softmax(logits / temperature, -1)[positions, tokens]
            torch.testing.assert_close(torch.tensor(got), want, **TOL)
    assert max(abs(a - b) for h, p in zip(at_07, at_1) for a, b in zip(h, p)) > 0.05  # T matters here
