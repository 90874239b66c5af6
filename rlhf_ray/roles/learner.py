"""The learner: one rank of a DeepSpeed ZeRO job, as a Ray actor. Every stage trains through it.

`LearnerGroup` is the driver's handle on all ranks: each method fans one real actor method out to every
rank and combines the answers. Batches arrive as an Arrow table in the object store (resolved zero-copy by
Ray) plus the row indices this rank owns; tensors are made here, never in the driver.
"""

from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import ray
import torch

from rlhf_ray.config import LearnerConfig, ModelConfig
from rlhf_ray.distributed.worker_group import (
    DistributedWorker,
    WorkerGroup,
    group_spec,
    shard_rows,
)
from rlhf_ray.roles.objectives import Objective, accumulate, step_metrics
from rlhf_ray.roles.step_guard import deepspeed_checks, guarded_step, skip_metrics


class Learner(DistributedWorker):
    """One rank: model + DeepSpeed engine + objective (an `Objective` object, built from the config by the
    driver and sent to every rank)."""

    def __init__(self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, objective: Objective, total_steps: int,
                 seed: int, device: str):
        self.model_cfg, self.cfg, self.objective = model_cfg, learner_cfg, objective
        self.total_steps, self.seed, self.device = total_steps, seed, device

    # -- set-up ---------------------------------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        """Join the process group, load the model (ZeRO-3: partitioned as it loads) and build the engine."""
        import deepspeed
        import torch._dynamo  # noqa: F401  (deepspeed.zero.Init fails on transformers 5.19 without it)
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()  # e.g. "score.weight newly initialized" is expected
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

        from rlhf_ray.distributed.deepspeed_setup import (
            build_lr_scheduler,
            build_optimizer,
            deepspeed_config,
        )
        from rlhf_ray.models.loading import load_tokenizer, resolve_dtype

        deepspeed.init_distributed(dist_backend="nccl" if self.device == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        self._seed_everything(self.seed)
        self.dtype = resolve_dtype(self.model_cfg.dtype, self.device)
        ds_config = deepspeed_config(self.cfg, self.dtype)
        self._hf_ds_config = None
        if self.cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(ds_config)  # kept alive: from_pretrained then uses zero.Init
        self.tokenizer = load_tokenizer(self.model_cfg)
        model = self.objective.load_model(self.model_cfg, torch.float32 if self.device == "cpu" else self.dtype,
                                          self.tokenizer)
        if self.cfg.lora is not None:  # adapters only: the optimizer below takes the trainable parameters
            from rlhf_ray.models.lora import apply_lora
            model = apply_lora(model, self.cfg.lora)
        optimizer = build_optimizer(model, self.cfg, self.device)
        # The scheduler is built on the optimizer DeepSpeed wraps (ZeRO may regroup parameters).
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: build_lr_scheduler(opt, self.cfg, self.total_steps))
        self.pad_id = self.tokenizer.pad_token_id
        num_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        return {"rank": self.rank, "num_params": num_params, "device": str(self.engine.device)}

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.engine.device)
        if self.world_size > 1:
            reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor.tolist()

    # -- training -------------------------------------------------------------------------------------------
    def train_step(self, table: pa.Table, rows: Sequence[int]) -> dict[str, float]:
        """One optimizer step over this rank's `rows` (micro_batch_size x grad_accum of them).

        The loss of each micro-batch is a sum divided by the token count of the *global* step, scaled so that
        DeepSpeed's averaging over ranks and accumulation steps cancels: the gradient is that of the mean
        over every token of the step, however the step is split.
        """
        began = time.perf_counter()
        self.engine.train()
        micro = self.cfg.micro_batch_size
        chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
        if len(chunks) != self.cfg.grad_accum:
            raise ValueError(f"rank {self.rank}: got {len(rows)} rows, expected "
                             f"{micro * self.cfg.grad_accum} (micro_batch_size x grad_accum)")
        batches = [self.objective.micro_batch(table, chunk, self.pad_id) for chunk in chunks]
        local = [sum(self.objective.count(b) for b in batches), sum(self.objective.num_tokens(b) for b in batches)]
        global_count, global_tokens = self._all_reduce(local)
        scale = self.world_size * self.cfg.grad_accum / max(global_count, 1.0)
        totals: dict[str, float] = {}
        # A step with a non-finite loss or gradient norm on any rank is skipped on all (`roles.step_guard`).
        skipped_before, nonfinite_loss, own_norm = self.engine.skipped_steps, 0.0, None
        guard_here = not deepspeed_checks(self.engine)
        for i, batch in enumerate(batches):
            out = self.objective.loss(self.engine, batch.to(self.engine.device))
            loss = out.loss_sum * scale
            # Kept on the device: one host sync per step (at the boundary), not one per micro-batch on GPU.
            nonfinite_loss = nonfinite_loss + (~torch.isfinite(loss.detach())).float()
            boundary = i == len(batches) - 1
            if boundary:  # every rank decides alike
                nonfinite_loss = self._all_reduce([float(nonfinite_loss)])[0]
                if nonfinite_loss and not guard_here:
                    loss = loss * float("nan")  # a NaN gradient norm everywhere: DeepSpeed's own check skips
            self.engine.backward(loss)
            if boundary and guard_here:
                own_norm = guarded_step(self.engine, nonfinite_loss > 0,
                                        lambda value: self._all_reduce([value], op="max")[0])
            else:
                self.engine.step()
            accumulate(totals, out)
        # The same keys on every rank (the same objective made them): sums, then maxima, in one call each.
        sums = sorted(k for k in totals if not k.startswith("max_stat/"))
        maxima = sorted(k for k in totals if k.startswith("max_stat/"))
        reduced = dict(zip(sums, self._all_reduce([totals[k] for k in sums])))
        if maxima:
            reduced.update(zip(maxima, self._all_reduce([totals[k] for k in maxima], op="max")))
        metrics = step_metrics(reduced, global_count)
        metrics.update({"lr": self.scheduler.get_last_lr()[0], "tokens": global_tokens, "loss_tokens": global_count,
                        "busy_seconds": time.perf_counter() - began})
        grad_norm = self.engine.get_global_grad_norm() if own_norm is None else own_norm
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update(skip_metrics(self.rank, self.cfg.zero_stage, self.engine.skipped_steps > skipped_before,
                                    nonfinite_loss, grad_norm))
        return metrics

    @torch.no_grad()
    def evaluate(self, table: pa.Table, rows: Sequence[int], num_batches: int) -> dict[str, float]:
        """Summed loss and count over `rows`, in exactly `num_batches` forwards (equal on every rank, as
        ZeRO-3 forwards are collectives)."""
        self.engine.eval()
        micro = self.cfg.micro_batch_size
        loss_sum = count = 0.0
        for i in range(num_batches):
            batch = self.objective.micro_batch(table, rows[i * micro:(i + 1) * micro], self.pad_id)
            out = self.objective.loss(self.engine.module, batch.to(self.engine.device))
            loss_sum += out.loss_sum.item()
            count += out.count.item()
        return {"loss_sum": loss_sum, "count": count}

    @torch.no_grad()
    def score(self, table: pa.Table, rows: Sequence[int], num_batches: int) -> list[list[float]]:
        """Per row, the model's score of each candidate (reward models); `num_batches` forwards on every rank."""
        self.engine.eval()
        micro = self.cfg.micro_batch_size
        out: list[list[float]] = []
        for i in range(num_batches):
            batch = self.objective.micro_batch(table, rows[i * micro:(i + 1) * micro], self.pad_id)
            out += self.objective.score(self.engine.module, batch.to(self.engine.device))
        return out

    @torch.no_grad()
    def response_logprobs(self, table: pa.Table, rows: Sequence[int], num_batches: int) -> pa.Table:
        """Policy: log p of each response token of `rows` -> table (row, values). `num_batches` on every rank."""
        return self._per_token(table, rows, num_batches, self.objective.logprobs)

    @torch.no_grad()
    def response_values(self, table: pa.Table, rows: Sequence[int], num_batches: int) -> pa.Table:
        """Critic: V(s_t) before each response token of `rows` -> table (row, values)."""
        return self._per_token(table, rows, num_batches, self.objective.values)

    def _per_token(self, table: pa.Table, rows: Sequence[int], num_batches: int, fn: Any) -> pa.Table:
        self.engine.eval()
        micro = self.cfg.micro_batch_size
        values: list[list[float]] = []
        for i in range(num_batches):
            batch = self.objective.micro_batch(table, rows[i * micro:(i + 1) * micro], self.pad_id)
            got = fn(self.engine.module, batch.to(self.engine.device))
            values += got[:len(rows[i * micro:(i + 1) * micro])]
        return pa.table({"row": pa.array(list(rows), pa.int64()), "values": pa.array(values, pa.list_(pa.float32()))})

    @torch.no_grad()
    def generate(self, table: pa.Table, rows: Sequence[int], num_batches: int, max_new_tokens: int) -> list[str]:
        """Greedy answers to the `prompt_ids` of `rows` (left-padded batches; `num_batches` on every rank), each
        stopped at the chat template's end of turn or the EOS."""
        from rlhf_ray.algorithms.masked import pad_sequences
        from rlhf_ray.models.chat import end_of_turn_ids

        self.engine.eval()
        micro = self.cfg.micro_batch_size
        prompts = table.column("prompt_ids").to_pylist()
        texts: list[str] = []
        stop = list(end_of_turn_ids(self.tokenizer))
        for i in range(num_batches):
            chunk = rows[i * micro:(i + 1) * micro]
            seqs = [prompts[r] for r in chunk] or [[self.tokenizer.eos_token_id]]
            input_ids = pad_sequences(seqs, self.pad_id, left=True).to(self.engine.device)
            attention = pad_sequences([[1] * len(s) for s in seqs], 0, left=True).to(self.engine.device)
            out = self.engine.module.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=self.pad_id, eos_token_id=stop,
                synced_gpus=self.cfg.zero_stage == 3 and self.world_size > 1)
            if chunk:
                texts += self.tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        return texts

    # -- saving ---------------------------------------------------------------------------------------------
    def save_model(self, path: str) -> Optional[str]:
        """Write the full model in Hugging Face format (safetensors + tokenizer); rank 0 writes.

        Every rank must call this (ZeRO-3 gathers are collectives). Written under a temporary name first.
        """
        from rlhf_ray.distributed.deepspeed_setup import (
            iter_full_parameters,
            lora_adapter,
        )
        from rlhf_ray.models.lora import save_adapter

        state = dict(iter_full_parameters(self.engine.module, self.cfg.zero_stage, self.rank))
        adapter = lora_adapter(self.engine.module, self.cfg.zero_stage, self.rank)  # LoRA: saved under adapter/
        if self.rank != 0:
            return None
        final = Path(path)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.engine.module.save_pretrained(tmp, state_dict=state)
        self.tokenizer.save_pretrained(tmp)
        if adapter is not None:
            save_adapter(self.engine.module, adapter, tmp / "adapter")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return str(final)

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed state (model, optimizer, scheduler shards) + this rank's RNG into `path` (every rank)."""
        self.engine.save_checkpoint(path, tag="state")
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, Path(path) / f"rng_rank{self.rank}.pt")

    def load_checkpoint(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        rng_file = Path(path) / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def parameter_checksum(self, bucket_bytes: int = 64 << 20) -> float:
        """Fingerprint of the full parameters, comparable with a generator's `weights_checksum` (rank 0's; other
        ranks only take part in the ZeRO-3 gathers)."""
        from rlhf_ray.distributed.deepspeed_setup import iter_full_parameters
        from rlhf_ray.distributed.weight_sync import checksum

        return checksum(iter_full_parameters(self.engine.module, self.cfg.zero_stage, self.rank, bucket_bytes))

    # -- weight sync to the generators (rank 0 sends) ---------------------------------------------------------
    def weight_plan(self, bucket_bytes: int) -> list:
        """The buckets of `TensorMeta` that `broadcast_weights` will send, in parameter order (under ZeRO-3 also
        the buckets it gathers, given the same `bucket_bytes`)."""
        from rlhf_ray.distributed.deepspeed_setup import parameter_metas
        from rlhf_ray.distributed.weight_sync import plan_buckets

        return plan_buckets(parameter_metas(self.engine.module), bucket_bytes)

    def init_weight_sync(self, master_addr: str, master_port: int, world_size: int,
                         timeout_s: Optional[float] = None) -> None:
        """Rank 0 joins the broadcast group with every generator worker (it is rank 0 there too). NCCL on
        CUDA (the weights are sent from GPU memory), gloo on CPU."""
        from rlhf_ray.distributed.weight_sync import (
            DEFAULT_TIMEOUT_S,
            create_sync_group,
        )

        cuda = self.device == "cuda"
        self._sync_device = self.engine.device if cuda else torch.device("cpu")
        if self.rank == 0:
            self.sync_group = create_sync_group(master_addr, master_port, 0, world_size, "nccl" if cuda else "gloo",
                                                DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)

    def broadcast_weights(self, plan: list, bucket_bytes: int = 64 << 20) -> int:
        """Send the full parameters bucket by bucket; pass the `bucket_bytes` the plan was made with, so that
        ZeRO-3 gathers the plan's buckets. Under ZeRO 0-2 the other ranks return at once; under ZeRO-3 every
        rank iterates (the gathers are collectives)."""
        from rlhf_ray.distributed.deepspeed_setup import iter_full_parameters
        from rlhf_ray.distributed.weight_sync import group_by_plan, send_weights

        params = iter_full_parameters(self.engine.module, self.cfg.zero_stage, self.rank, bucket_bytes,
                                      device=self._sync_device)
        if self.rank != 0:
            for _ in params:  # nothing to iterate under ZeRO 0-2
                pass
            return 0
        return send_weights(self.sync_group, group_by_plan(params, plan), device=self._sync_device)

    def weights_bytes(self, bucket_bytes: int = 64 << 20) -> Optional[bytes]:
        """Safetensors bytes of the full parameters on rank 0 (object-store transport); None elsewhere."""
        from rlhf_ray.distributed.deepspeed_setup import iter_full_parameters
        from rlhf_ray.distributed.weight_sync import weights_to_bytes

        named = list(iter_full_parameters(self.engine.module, self.cfg.zero_stage, self.rank, bucket_bytes))
        return weights_to_bytes(named) if self.rank == 0 else None


class LearnerGroup:
    """The driver's handle on a learner group: typed methods, each fanned out to every rank."""

    def __init__(self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, objective: Objective, total_steps: int,
                 seed: int, device: str, runtime_env: Optional[dict] = None, name: str = "learner",
                 wait: bool = True):
        """`wait=False` returns once the ranks are placed, with their set-up (model load, DeepSpeed) still
        running: call `ready()` before using the group (the RLHF roles start side by side this way)."""
        spec = group_spec(name, learner_cfg.num_ranks, learner_cfg.placement, learner_cfg.gpus_per_rank, device)
        self.cfg = learner_cfg
        self.group: WorkerGroup[Any] = WorkerGroup(Learner, spec, model_cfg, learner_cfg, objective, total_steps,
                                                   seed, device, runtime_env=runtime_env, distributed=True)
        self.group.start(lambda a, r: a.setup.remote())
        if wait:
            self.ready()

    def ready(self) -> list[dict[str, Any]]:
        """Wait for every rank's set-up; returns what each reported."""
        return self.group.ready()

    @property
    def num_ranks(self) -> int:
        return len(self.group)

    def train_step(self, table: ray.ObjectRef, shards: Sequence[Sequence[int]]) -> dict[str, float]:
        """One optimizer step; rank r trains on `shards[r]`."""
        return ray.get(self.start_train_step(table, shards))[0]

    def start_train_step(self, table: ray.ObjectRef, shards: Sequence[Sequence[int]]) -> list[ray.ObjectRef]:
        """`train_step` without waiting: refs to every rank's metrics (rank 0's first; all ranks agree), so two
        groups (policy and critic) can train at the same time."""
        return self.group.map(lambda a, r: a.train_step.remote(table, list(shards[r])))

    def response_logprobs(self, table: ray.ObjectRef, num_rows: int) -> list[ray.ObjectRef]:
        """Per rank, a ref to a (row, values) table of policy logprobs; rows sharded, nothing fetched here."""
        shards, num_batches = self._eval_shards(list(range(num_rows)))
        return self.group.map(lambda a, r: a.response_logprobs.remote(table, shards[r], num_batches))

    def response_values(self, table: ray.ObjectRef, num_rows: int) -> list[ray.ObjectRef]:
        """Per rank, a ref to a (row, values) table of critic values."""
        shards, num_batches = self._eval_shards(list(range(num_rows)))
        return self.group.map(lambda a, r: a.response_values.remote(table, shards[r], num_batches))

    def evaluate(self, table: ray.ObjectRef, rows: Sequence[int]) -> dict[str, float]:
        shards, num_batches = self._eval_shards(rows)
        parts = self.group.get(lambda a, r: a.evaluate.remote(table, shards[r], num_batches))
        loss_sum, count = sum(p["loss_sum"] for p in parts), sum(p["count"] for p in parts)
        return {"loss": loss_sum / max(count, 1.0), "count": count}

    def score(self, table: ray.ObjectRef, rows: Sequence[int]) -> list[list[float]]:
        """Per row of `rows` (in that order), the score of each candidate."""
        shards, num_batches = self._eval_shards(rows)
        parts = self.group.get(lambda a, r: a.score.remote(table, shards[r], num_batches))
        return [score for scores in parts for score in scores]  # contiguous shards: rank order is row order

    def generate(self, table: ray.ObjectRef, rows: Sequence[int], max_new_tokens: int) -> list[str]:
        """Greedy answers for `rows`, in the order of `rows`."""
        shards, num_batches = self._eval_shards(rows)
        parts = self.group.get(lambda a, r: a.generate.remote(table, shards[r], num_batches, max_new_tokens))
        return [text for texts in parts for text in texts]

    def _eval_shards(self, rows: Sequence[int]) -> tuple[list[list[int]], int]:
        """`shard_rows` over the ranks, and the micro-batches each rank runs (the same on every rank: ZeRO-3
        forwards are collectives)."""
        shards = shard_rows(rows, self.num_ranks)
        longest = max(len(s) for s in shards)
        return shards, max(1, -(-longest // self.cfg.micro_batch_size))

    def save_model(self, path: str | os.PathLike) -> str:
        return self.group.get(lambda a, r: a.save_model.remote(str(path)))[0]

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        self.group.get(lambda a, r: a.save_checkpoint.remote(str(path)))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        self.group.get(lambda a, r: a.load_checkpoint.remote(str(path)))

    def parameter_checksum(self, bucket_bytes: int = 64 << 20) -> float:
        return self.group.get(lambda a, r: a.parameter_checksum.remote(bucket_bytes))[0]

    # -- weight sync (rank 0 sends; see distributed.weight_transfer) ------------------------------------------
    def sync_address(self) -> tuple[str, int]:
        """(IP address, free port) of rank 0's node: where the weight-sync group meets."""
        _, address, port = ray.get(self.group.actors[0].node_address.remote())
        return address, port

    def init_weight_sync(self, master_addr: str, master_port: int, world_size: int,
                         timeout_s: float) -> list[ray.ObjectRef]:
        """Start rank 0 joining the weight-sync group as its rank 0 (the others return at once)."""
        return self.group.map(lambda a, r: a.init_weight_sync.remote(master_addr, master_port, world_size, timeout_s))

    def weight_plan(self, bucket_bytes: int) -> list:
        """The buckets of `TensorMeta` a broadcast sends (rank 0's view; every rank has the same model)."""
        return ray.get(self.group.actors[0].weight_plan.remote(bucket_bytes))

    def broadcast_weights(self, plan: list, bucket_bytes: int) -> list[ray.ObjectRef]:
        """Start every rank's part of one broadcast (rank 0 sends; under ZeRO-3 all ranks gather)."""
        return self.group.map(lambda a, r: a.broadcast_weights.remote(plan, bucket_bytes))

    def weights_bytes(self, bucket_bytes: int) -> ray.ObjectRef:
        """A ref to rank 0's safetensors bytes of the full parameters (waits for every rank's part)."""
        blobs = self.group.map(lambda a, r: a.weights_bytes.remote(bucket_bytes))
        ray.get(blobs[1:])
        return blobs[0]

    def shutdown(self) -> None:
        self.group.shutdown()
