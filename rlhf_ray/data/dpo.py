"""DPO data: the reward model's preference table -> one row per judged prompt, with the pairs to compare.

The feedback is read, validated, tokenized and split exactly as for the reward model
(`data.preference.load_preference_data`, so a prompt is never in both train and eval), then:

- a pair row stays a pair: candidates (chosen, rejected), pairs [(0, 1)], its margin;
- a ranking row keeps its k candidates and its order; its pairs are all k(k-1)/2 ordered pairs (the objective
  averages them, so a prompt weighs as one pair) unless the loss is listwise;
- the rating rows of one prompt become one row: its rated responses, and a pair for every two of them with
  different scores, higher score chosen (ties and repeated responses state no preference and are skipped).
  Scores are kept, and `order` lists the candidates by score, best first.

Each candidate is prompt + response tokens; `prompt_ids` (the rendered prompt with its generation prompt) is a
prefix of every candidate, so the response tokens, whose log-probabilities DPO compares, are those after it.
The reference policy's summed response log-probability of every candidate is added later as `ref_logps`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any, Optional, Sequence

import pyarrow as pa
import torch

from rlhf_ray.algorithms.losses import ranking_pairs
from rlhf_ray.algorithms.masked import pad_sequences
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.preference import load_preference_data
from rlhf_ray.data.sft import encode

DPO_SCHEMA = pa.schema([
    ("kind", pa.string()),                          # "pair" | "ranking" | "ratings"
    ("sequences", pa.list_(pa.list_(pa.int32()))),  # [k][tokens]: prompt + each response
    ("prompt_ids", pa.list_(pa.int32())),           # the prompt: a prefix of every candidate
    ("pairs", pa.list_(pa.list_(pa.int32()))),      # [(better, worse)] candidate indices
    ("order", pa.list_(pa.int32())),                # [k] candidates best first (ratings: by score)
    ("scores", pa.list_(pa.float32())),             # ratings: [k] normalised scores; else []
    ("margin", pa.float32()),                       # pair: the row's margin; else 0
    ("group", pa.int64()),                          # index of the prompt
    ("prompt_text", pa.string()),
    ("responses", pa.list_(pa.string())),
    ("metadata", pa.string()),                      # JSON: the row's other fields (ratings: those all share)
])
REF_COLUMN = "ref_logps"  # [k] reference policy's summed response-token logprobs, added before training


@dataclass(frozen=True)
class DPOData:
    train: pa.Table
    eval: pa.Table
    stats: dict[str, Any]


def _row(kind: str, sequences: list, prompt_ids: list[int], pairs: list, order: list, scores: list,
         margin: float, group: int, prompt_text: str, responses: list, metadata: str) -> dict[str, Any]:
    return {"kind": kind, "sequences": sequences, "prompt_ids": prompt_ids, "pairs": [list(p) for p in pairs],
            "order": list(order), "scores": scores, "margin": margin, "group": group, "prompt_text": prompt_text,
            "responses": responses, "metadata": metadata}


def _shared_metadata(metadata: Sequence[str]) -> str:
    """The fields every rating of a prompt has with the same value (e.g. the task and input a checker needs)."""
    parsed = [json.loads(m) for m in metadata]
    shared = {k: v for k, v in parsed[0].items() if all(k in p and p[k] == v for p in parsed[1:])}
    return json.dumps(shared, ensure_ascii=False, default=str)


def ratings_row(ratings: Sequence[dict[str, Any]], prompt_ids: list[int]) -> tuple[Optional[dict[str, Any]], int]:
    """(one DPO row for the ratings of one prompt, or None when they state no preference; ties skipped).

    `ratings` are rows of the preference table of kind "rating" sharing a prompt.
    """
    scores = [r["scores"][0] for r in ratings]
    texts = [r["responses"][0] for r in ratings]
    pairs, ties = [], 0
    for i, j in combinations(range(len(ratings)), 2):
        if scores[i] == scores[j] or texts[i].strip() == texts[j].strip():
            ties += 1
            continue
        pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    if not pairs:
        return None, ties
    order = sorted(range(len(ratings)), key=lambda i: -scores[i])
    first = ratings[0]
    row = _row("ratings", [r["sequences"][0] for r in ratings], prompt_ids, pairs, order, scores, 0.0,
               first["group"], first["prompt_text"], texts, _shared_metadata([r["metadata"] for r in ratings]))
    return row, ties


def _prompt_ids(tokenizer: Any, row: dict[str, Any], source: str) -> list[int]:
    ids = encode(tokenizer, row["prompt_text"])
    for k, seq in enumerate(row["sequences"]):
        if list(seq[:len(ids)]) != ids or len(seq) <= len(ids):
            raise DataError(source, f"response {k} of a row does not tokenize as the rendered prompt followed by "
                                    "response tokens, so its response tokens cannot be located; DPO needs a chat "
                                    "template that renders the prompt the same whatever follows",
                            detail=f"prompt {row['prompt_text']!r:.60}, response {row['responses'][k]!r:.40}")
    return ids


def to_dpo_table(preferences: pa.Table, tokenizer: Any, source: str = "feedback") -> tuple[pa.Table, dict[str, int]]:
    """(DPO table, counts) from a preference table (`data.preference.PREFERENCE_SCHEMA`) read from `source`."""
    rows, ratings = [], defaultdict(list)
    counts = {"pairs": 0, "rankings": 0, "rating_prompts": 0, "rating_ties_skipped": 0,
              "rating_prompts_without_preference": 0}
    for row in preferences.to_pylist():
        if row["kind"] == "rating":
            ratings[row["group"]].append(row)
            continue
        pairs = [(0, 1)] if row["kind"] == "pair" else ranking_pairs(row["order"])
        counts["pairs" if row["kind"] == "pair" else "rankings"] += 1
        rows.append(_row(row["kind"], row["sequences"], _prompt_ids(tokenizer, row, source), pairs, row["order"],
                         [], row["margin"], row["group"], row["prompt_text"], row["responses"], row["metadata"]))
    for group in ratings.values():
        made, ties = ratings_row(group, _prompt_ids(tokenizer, group[0], source))
        counts["rating_ties_skipped"] += ties
        if made is None:
            counts["rating_prompts_without_preference"] += 1
        else:
            counts["rating_prompts"] += 1
            rows.append(made)
    return pa.Table.from_pylist(rows, schema=DPO_SCHEMA), counts


def load_dpo_data(cfg: Any, tokenizer: Any, seed: int) -> DPOData:
    """Train and eval DPO tables from a `RewardDataConfig` (ratings are always turned into pairs here)."""
    data = load_preference_data(replace(cfg, ratings_to_pairs=False), tokenizer, seed)
    train, train_counts = to_dpo_table(data.train, tokenizer, cfg.train)
    held, eval_counts = to_dpo_table(data.eval, tokenizer, cfg.eval or cfg.train)
    if train.num_rows == 0:
        raise DataError(cfg.train, "no feedback row states a preference (every prompt's ratings are ties)")
    stats = {**data.stats, "dpo_train": {"rows": train.num_rows, **train_counts},
             "dpo_eval": {"rows": held.num_rows, **eval_counts}}
    return DPOData(train, held, stats)


def candidate_table(table: pa.Table) -> pa.Table:
    """Every candidate of every row as (prompt_ids, response_ids), rows in order: what the reference actors
    score (`roles.scorers.ReferenceActor.logprobs`)."""
    prompts, responses = [], []
    for prompt, sequences in zip(table.column("prompt_ids").to_pylist(), table.column("sequences").to_pylist()):
        for seq in sequences:
            prompts.append(prompt)
            responses.append(seq[len(prompt):])
    return pa.table({"prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
                     "response_ids": pa.array(responses, pa.list_(pa.int32()))})


def with_reference(table: pa.Table, candidate_sums: Sequence[float]) -> pa.Table:
    """`table` with `ref_logps`: the flat per-candidate sums (in `candidate_table` order) regrouped per row."""
    sizes = [len(s) for s in table.column("sequences").to_pylist()]
    if sum(sizes) != len(candidate_sums):
        raise ValueError(f"with_reference: {len(candidate_sums)} sums for {sum(sizes)} candidates")
    grouped, start = [], 0
    for size in sizes:
        grouped.append([float(x) for x in candidate_sums[start:start + size]])
        start += size
    if REF_COLUMN in table.column_names:
        table = table.drop_columns([REF_COLUMN])
    return table.append_column(REF_COLUMN, pa.array(grouped, pa.list_(pa.float32())))


@dataclass(frozen=True)
class DPOBatch:
    """Rows of a DPO table flattened to one padded batch of candidates, with each row's judgement."""

    input_ids: torch.Tensor        # [S, L] every candidate of every row, right-padded
    attention_mask: torch.Tensor   # [S, L]
    response_index: torch.Tensor   # [S, T] position whose logits predict response token t
    mask: torch.Tensor             # [S, T] 1 on real response tokens
    ref_logps: Optional[torch.Tensor]  # [S] the reference's summed response logprobs; None without the column
    offsets: list[int]             # row i's candidates are offsets[i]:offsets[i+1]
    kinds: list[str]               # per row
    pairs: list[list[list[int]]]   # per row: (better, worse) pairs
    orders: list[list[int]]        # per row: candidates best first
    margins: list[float]           # per row

    @property
    def lengths(self) -> torch.Tensor:
        """[S] response tokens per candidate."""
        return self.mask.sum(-1)

    def to(self, device: str | torch.device) -> "DPOBatch":
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        return DPOBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_index.to(device),
                        self.mask.to(device), ref, self.offsets, self.kinds, self.pairs, self.orders, self.margins)


def collate_dpo(table: pa.Table, rows: Sequence[int], pad_id: int) -> DPOBatch:
    """Rows of a DPO table as one batch; no rows gives one masked dummy candidate and no judgements (ranks with
    nothing to do still join ZeRO-3 collectives)."""
    has_ref = REF_COLUMN in table.column_names
    if not rows:
        return DPOBatch(torch.full((1, 2), pad_id), torch.ones(1, 2, dtype=torch.long),
                        torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1),
                        torch.zeros(1) if has_ref else None, [0], [], [], [], [])
    part = table.take(list(rows)).to_pydict()
    sequences, prompt_lengths, offsets = [], [], [0]
    for prompt, candidates in zip(part["prompt_ids"], part["sequences"]):
        sequences += candidates
        prompt_lengths += [len(prompt)] * len(candidates)
        offsets.append(offsets[-1] + len(candidates))
    width = max(len(s) - p for s, p in zip(sequences, prompt_lengths))
    index = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        index[i, :len(seq) - p] = torch.arange(p - 1, len(seq) - 1)  # position t-1 predicts token t
        mask[i, :len(seq) - p] = 1.0
    ref = torch.tensor([x for row in part[REF_COLUMN] for x in row]) if has_ref else None
    return DPOBatch(pad_sequences(sequences, pad_id), pad_sequences([[1] * len(s) for s in sequences], 0), index,
                    mask, ref, offsets, part["kind"], part["pairs"], part["order"],
                    [float(m) for m in part["margin"]])
