"""Scorers: the reference policy (log-probabilities for the KL term) and the reward (model and/or rules).

Each is a Ray actor with one job. It reads a rollout table from the object store (zero-copy), makes its own
tensors, and returns a small Arrow table aligned with the rollout rows, which Ray stores once.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import pyarrow as pa
import torch

from rlhf_ray.config import ModelConfig, RewardConfig
from rlhf_ray.rollout.schema import REWARD_SCHEMA


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def sequence_batches(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                     micro_batch_size: int, pad_id: int):
    """Yield (start, input_ids [b, L], attention [b, L]) over prompt+response sequences, right-padded."""
    from rlhf_ray.data.collate import pad_sequences

    for start in range(0, len(prompt_ids), micro_batch_size):
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids[start:start + micro_batch_size],
                                                   response_ids[start:start + micro_batch_size])]
        yield start, pad_sequences(seqs, pad_id), pad_sequences([[1] * len(s) for s in seqs], 0)


def response_logprobs(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]],
                      response_ids: Sequence[Sequence[int]], micro_batch_size: int, pad_id: int,
                      device: str | torch.device) -> list[list[float]]:
    """log p(response token | everything before it) for every response token of every row."""
    from rlhf_ray.algorithms.losses import next_token_logprobs

    out: list[list[float]] = []
    for start, input_ids, attention in sequence_batches(prompt_ids, response_ids, micro_batch_size, pad_id):
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        logprobs = next_token_logprobs(logits, input_ids.to(device)).cpu()  # [b, L-1]; t-1 scores token t
        for i in range(input_ids.shape[0]):
            p, r = len(prompt_ids[start + i]), len(response_ids[start + i])
            out.append(logprobs[i, p - 1:p - 1 + r].tolist())
    return out


class ReferenceActor:
    """Reference-policy log-probabilities of the response tokens (the SFT model, frozen)."""

    def __init__(self, model_cfg: ModelConfig, micro_batch_size: int, device: str):
        from rlhf_ray.models.loading import (
            load_causal_lm,
            load_tokenizer,
            resolve_dtype,
        )

        _quiet_transformers()
        self.device = "cuda" if device == "cuda" else "cpu"
        self.model = load_causal_lm(model_cfg, resolve_dtype(model_cfg.dtype, self.device)).to(self.device).eval()
        self.pad_id = load_tokenizer(model_cfg).pad_token_id
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def logprobs(self, rollouts: pa.Table, rows: Sequence[int]) -> pa.Table:
        """(row, values): reference log-probabilities of the response tokens of `rows`."""
        part = rollouts.take(list(rows))
        values = response_logprobs(self.model, part.column("prompt_ids").to_pylist(),
                                   part.column("response_ids").to_pylist(), self.micro_batch_size,
                                   self.pad_id, self.device)
        return pa.table({"row": pa.array(list(rows), pa.int64()), "values": pa.array(values, pa.list_(pa.float32()))})


class RewardActor:
    """Sequence scores: a weighted sum of the reward model's (normalised) score and rule-based functions."""

    def __init__(self, cfg: RewardConfig, policy_tokenizer_path: str, device: str, micro_batch_size: int = 32):
        from rlhf_ray.rewards import load_reward_function

        _quiet_transformers()
        self.cfg = cfg
        self.device = "cuda" if device == "cuda" else "cpu"
        self.micro_batch_size = micro_batch_size
        self.functions = [(f.path, load_reward_function(f.path), f.weight) for f in cfg.functions]
        self.model: Optional[torch.nn.Module] = None
        if cfg.model:
            self._load_reward_model(cfg.model, policy_tokenizer_path)

    def _load_reward_model(self, path: str, policy_tokenizer_path: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf_ray.models.tiny import resolve_model_path

        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        policy_tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(policy_tokenizer_path))
        # Same vocabulary: score the generated ids as they are; else re-tokenize the text.
        self.same_tokens = policy_tokenizer.get_vocab() == self.tokenizer.get_vocab()
        stats_file = Path(path) / "reward_stats.json"
        self.mean, self.std = 0.0, 1.0
        if self.cfg.normalize and stats_file.is_file():
            stats = json.loads(stats_file.read_text())
            self.mean, self.std = float(stats["mean"]), max(float(stats["std"]), 1e-6)

    @torch.no_grad()
    def _model_scores(self, rollouts: pa.Table) -> list[float]:
        prompt_ids = rollouts.column("prompt_ids").to_pylist()
        response_ids = rollouts.column("response_ids").to_pylist()
        if not self.same_tokens:
            texts = [p + r + (self.tokenizer.eos_token or "") for p, r in
                     zip(rollouts.column("prompt_text").to_pylist(), rollouts.column("response_text").to_pylist())]
            prompt_ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
            response_ids = [[] for _ in texts]
        pad = self.model.config.pad_token_id
        scores: list[float] = []
        for _, input_ids, attention in sequence_batches(prompt_ids, response_ids, self.micro_batch_size, pad):
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
            scores += ((logits[:, 0].float().cpu() - self.mean) / self.std).tolist()
        return scores

    def score(self, rollouts: pa.Table, rows: Sequence[int]) -> pa.Table:
        """(row, score, score/<component>...) for `rows` of the rollouts."""
        table = self._score(rollouts.take(list(rows)))
        return table.add_column(0, "row", pa.array(list(rows), pa.int64()))

    def _score(self, rollouts: pa.Table) -> pa.Table:
        from rlhf_ray.rewards import call_reward_function

        n = rollouts.num_rows
        total = [0.0] * n
        columns: dict[str, list[float]] = {}
        if self.model is not None:
            columns["score/reward_model"] = self._model_scores(rollouts)
            total = [t + self.cfg.model_weight * s for t, s in zip(total, columns["score/reward_model"])]
        if self.functions:
            prompts = rollouts.column("prompt_text").to_pylist()
            responses = rollouts.column("response_text").to_pylist()
            metadata = [json.loads(m) for m in rollouts.column("metadata").to_pylist()]
            for path, fn, weight in self.functions:
                values = call_reward_function(path, fn, prompts, responses, metadata)
                columns[f"score/{path.rpartition(':')[2]}"] = values
                total = [t + weight * v for t, v in zip(total, values)]
        # Checked before clipping: min/max would turn a NaN into +clip and hide it.
        if not all(math.isfinite(t) for t in total):
            raise ValueError("the reward model produced a non-finite score (check the model and its stats)")
        if self.cfg.clip is not None:
            total = [max(-self.cfg.clip, min(self.cfg.clip, t)) for t in total]
        table = pa.Table.from_pydict({"score": total}, schema=REWARD_SCHEMA)
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values, pa.float32()))
        return table
