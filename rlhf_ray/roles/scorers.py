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
    from rlhf_ray.algorithms.masked import pad_sequences

    for start in range(0, len(prompt_ids), micro_batch_size):
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids[start:start + micro_batch_size],
                                                   response_ids[start:start + micro_batch_size])]
        yield start, pad_sequences(seqs, pad_id), pad_sequences([[1] * len(s) for s in seqs], 0)


def response_logprobs(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]],
                      response_ids: Sequence[Sequence[int]], micro_batch_size: int, pad_id: int,
                      device: str | torch.device, temperature: float = 1.0) -> list[list[float]]:
    """log p_T(response token | everything before it), `p_T = softmax(logits / temperature)`, for every
    response token of every row; computed at response positions only, a chunk of positions at a time."""
    from rlhf_ray.models.causal_lm import response_logprobs as causal_lm_logprobs

    out: list[list[float]] = []
    for start, input_ids, attention in sequence_batches(prompt_ids, response_ids, micro_batch_size, pad_id):
        prompts, responses = prompt_ids[start:start + len(input_ids)], response_ids[start:start + len(input_ids)]
        width = max(1, max(len(r) for r in responses))
        index = torch.zeros(len(responses), width, dtype=torch.long)
        mask = torch.zeros(len(responses), width)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            index[i, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))  # position t-1 scores token t
            mask[i, :len(r)] = 1.0
        logprobs, _ = causal_lm_logprobs(model, input_ids.to(device), attention.to(device), index.to(device),
                                         mask.to(device), temperature)
        out += [row[:len(r)] for row, r in zip(logprobs.cpu().tolist(), responses)]
    return out


class ReferenceActor:
    """Reference-policy log-probabilities of the response tokens (the SFT model, frozen), under the sampling
    distribution `softmax(logits / temperature)` the rollouts were drawn from."""

    def __init__(self, model_cfg: ModelConfig, micro_batch_size: int, device: str, temperature: float = 1.0):
        from rlhf_ray.models.loading import (
            load_causal_lm,
            load_tokenizer,
            resolve_dtype,
        )

        if temperature <= 0:
            raise ValueError(f"reference temperature must be > 0 (score greedy rollouts at 1), got {temperature}")
        _quiet_transformers()
        self.device = "cuda" if device == "cuda" else "cpu"
        self.model = load_causal_lm(model_cfg, resolve_dtype(model_cfg.dtype, self.device)).to(self.device).eval()
        self.pad_id = load_tokenizer(model_cfg).pad_token_id
        self.micro_batch_size = micro_batch_size
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, rollouts: pa.Table, rows: Sequence[int], temperature: Optional[float] = None) -> pa.Table:
        """(row, values): reference log-probabilities of the response tokens of `rows`, at `temperature`
        (default: the one the actor was made with; greedy evaluation rollouts are scored at 1)."""
        part = rollouts.take(list(rows))
        values = response_logprobs(self.model, part.column("prompt_ids").to_pylist(),
                                   part.column("response_ids").to_pylist(), self.micro_batch_size,
                                   self.pad_id, self.device, self.temperature if temperature is None else temperature)
        return pa.table({"row": pa.array(list(rows), pa.int64()), "values": pa.array(values, pa.list_(pa.float32()))})


class RewardActor:
    """Sequence scores: a weighted sum of the reward model's (normalised) score and rule-based functions."""

    def __init__(self, cfg: RewardConfig, device: str, micro_batch_size: int = 32):
        from rlhf_ray.rewards import load_reward_function

        _quiet_transformers()
        self.cfg = cfg
        self.device = "cuda" if device == "cuda" else "cpu"
        self.micro_batch_size = micro_batch_size
        self.functions = [(f.path, load_reward_function(f.path), f.weight) for f in cfg.functions]
        self._warned: set[str] = set()  # components already warned about for non-finite scores
        self.model: Optional[torch.nn.Module] = None
        if cfg.model:
            self._load_reward_model(cfg.model)

    def _load_reward_model(self, path: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf_ray.data.sft import require_chat_template
        from rlhf_ray.models.loading import disable_dropout, resolve_dtype

        # bfloat16 on CUDA, float32 on CPU, as every other role (the scores are normalised in float32).
        self.model = disable_dropout(AutoModelForSequenceClassification.from_pretrained(
            path, dtype=resolve_dtype("auto", self.device))).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            raise ValueError(f"reward model {path}: its config has no pad_token_id, so it cannot find the last "
                             "token of a padded sequence; set pad_token_id in its config.json")
        # Samples are re-rendered with the reward model's own tokenizer and template, exactly as its training
        # candidates were, whatever the policy's tokenizer: the policy's ids end elsewhere (ChatML's "\n" after
        # <|im_end|> is never generated).
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        require_chat_template(self.tokenizer)
        stats_file = Path(path) / "reward_stats.json"
        self.mean, self.std = 0.0, 1.0
        if self.cfg.normalize and stats_file.is_file():
            stats = json.loads(stats_file.read_text())
            self.mean, self.std = float(stats["mean"]), max(float(stats["std"]), 1e-6)

    def model_inputs(self, rollouts: pa.Table) -> list[list[int]]:
        """What the reward model reads for each row: the prompt's messages + `{assistant: response_text}`,
        rendered and tokenized by RM training's own function (`data.preference.candidate_ids`)."""
        from rlhf_ray.data.preference import candidate_ids

        sequences = []
        for i, (messages, response) in enumerate(zip(rollouts.column("prompt_messages").to_pylist(),
                                                     rollouts.column("response_text").to_pylist())):
            if not messages:
                raise ValueError(f"rollout row {i}: prompt_messages is empty; the reward model scores the prompt's "
                                 "messages + the response (prompt tables from data.prompts.load_prompts have them)")
            sequences.append(candidate_ids(self.tokenizer, messages, response))
        return sequences

    @torch.no_grad()
    def _model_scores(self, rollouts: pa.Table) -> list[float]:
        """Normalised reward-model scores, read (as in RM training) at each sequence's last non-pad token."""
        from rlhf_ray.algorithms.masked import pad_sequences

        sequences = self.model_inputs(rollouts)
        pad = self.model.config.pad_token_id
        scores: list[float] = []
        for start in range(0, len(sequences), self.micro_batch_size):
            chunk = sequences[start:start + self.micro_batch_size]
            input_ids = pad_sequences(chunk, pad).to(self.device)
            attention = pad_sequences([[1] * len(s) for s in chunk], 0).to(self.device)
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits
            scores += ((logits[:, 0].float().cpu() - self.mean) / self.std).tolist()
        return scores

    def score(self, rollouts: pa.Table, rows: Sequence[int]) -> pa.Table:
        """(row, score, score/<component>...) for `rows` of the rollouts."""
        table = self._score(rollouts.take(list(rows)))
        return table.add_column(0, "row", pa.array(list(rows), pa.int64()))

    def _score(self, rollouts: pa.Table) -> pa.Table:
        """(score, score/<component>...): the weighted sum and each component. A NaN or infinite score is
        passed on as it is (the driver's bad-step guard skips the step), with a warning naming the component."""
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
        self._warn_non_finite(columns)
        if self.cfg.clip is not None:  # min/max would turn NaN into +clip and inf into a finite score: keep them
            total = [max(-self.cfg.clip, min(self.cfg.clip, t)) if math.isfinite(t) else t for t in total]
        table = pa.Table.from_pydict({"score": total}, schema=REWARD_SCHEMA)
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values, pa.float32()))
        return table

    def _warn_non_finite(self, columns: dict[str, list[float]]) -> None:
        """Warn once per actor and component about its first non-finite scores (rows of this batch)."""
        for name, values in columns.items():
            rows = [i for i, v in enumerate(values) if not math.isfinite(v)]
            if rows and name not in self._warned:
                self._warned.add(name)
                what = "the reward model" if name == "score/reward_model" else f"reward function {name[6:]}"
                warnings.warn(f"{what} gave non-finite scores ({values[rows[0]]}) to {len(rows)} of {len(values)} "
                              f"rollouts (batch rows {rows[:8]}); the step is skipped by the bad-step guard "
                              "(run.max_bad_steps). Warned once per component.", RuntimeWarning, stacklevel=2)
