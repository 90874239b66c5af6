"""DPO data (feedback -> one row per judged prompt), its collation, the DPO objective on the tiny model, and
the DPO config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_ray.algorithms.dpo import DPO_LOSSES, row_loss
from rlhf_ray.cli import STAGE_CONFIGS, build_parser
from rlhf_ray.config import DPOConfig, RewardDataConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.data.dpo import (
    REF_COLUMN,
    candidate_table,
    collate_dpo,
    load_dpo_data,
    with_reference,
)
from rlhf_ray.data.errors import DataError
from rlhf_ray.data.sft import encode, render
from rlhf_ray.roles.dpo_objective import DPOObjective


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path: Path, tok, rows: list[dict], *overrides: str):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = load_config(RewardDataConfig, None, [f"train={train}", "eval_fraction=0.0", *overrides])
    return load_dpo_data(cfg, tok, seed=0)


def prompt_ids(tok, text: str) -> list[int]:
    return encode(tok, render(tok, [{"role": "user", "content": text}], generation_prompt=True))


def test_ratings_of_a_prompt_become_one_row_of_pairs_higher_score_chosen(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "sort\ncab", "response": r, "score": s, "task": "sort", "input": "cab", "id": i}
            for i, (r, s) in enumerate([("acb", 3), ("abc", 5), ("cab", 3)])]
    rows += [{"prompt": "sort\nba", "response": r, "score": 2, "task": "sort"} for r in ("ab", "ba")]  # ties only
    data = load(tmp_path, tiny_tokenizer, rows)
    table = data.train.to_pylist()
    assert len(table) == 1
    row = table[0]
    assert row["kind"] == "ratings" and row["responses"] == ["acb", "abc", "cab"]
    assert row["pairs"] == [[1, 0], [1, 2]]  # acb vs cab is a tie: skipped
    assert row["order"][0] == 1 and row["scores"] == pytest.approx([0.5, 1.0, 0.5])
    assert json.loads(row["metadata"]) == {"task": "sort", "input": "cab"}  # the fields every rating shares
    assert row["prompt_ids"] == prompt_ids(tiny_tokenizer, "sort\ncab")
    assert data.stats["dpo_train"] == {"rows": 1, "pairs": 0, "rankings": 0, "rating_prompts": 1,
                                       "rating_ties_skipped": 2, "rating_prompts_without_preference": 1}


def test_rankings_keep_their_candidates_with_every_ordered_pair(tmp_path, tiny_tokenizer):
    ranking = {"prompt": "sort\ncab", "responses": ["cab", "abc", "acb"], "ranking": [1, 2, 0]}
    row = load(tmp_path, tiny_tokenizer, [ranking]).train.to_pylist()[0]
    assert row["kind"] == "ranking" and row["order"] == [1, 2, 0]
    assert row["pairs"] == [[1, 2], [1, 0], [2, 0]]
    ids = prompt_ids(tiny_tokenizer, "sort\ncab")
    assert all(seq[:len(ids)] == ids and len(seq) > len(ids) for seq in row["sequences"])


def test_pairs_keep_their_margin(tmp_path, tiny_tokenizer):
    pair = {"prompt": "reverse\nab", "chosen": "ba", "rejected": "ab", "margin": 1.5}
    row = load(tmp_path, tiny_tokenizer, [pair]).train.to_pylist()[0]
    assert (row["kind"], row["pairs"], row["order"], row["margin"]) == ("pair", [[0, 1]], [0, 1], 1.5)


def test_ratings_without_any_preference_are_an_error_naming_the_file(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "sort\nba", "response": r, "score": 2} for r in ("ab", "ba")]
    with pytest.raises(DataError, match=r"train\.jsonl: no feedback row states a preference"):
        load(tmp_path, tiny_tokenizer, rows)


def test_collate_locates_each_candidates_response_tokens(tmp_path, tiny_tokenizer):
    pair = {"prompt": "reverse\nab", "chosen": "ba", "rejected": "abab"}
    table = load(tmp_path, tiny_tokenizer, [pair]).train
    table = with_reference(table, [-1.0, -2.0])
    batch = collate_dpo(table, [0], pad_id=0)
    p = len(table.column("prompt_ids")[0].as_py())
    seqs = table.column("sequences")[0].as_py()
    lengths = [len(s) - p for s in seqs]
    assert batch.lengths.tolist() == lengths and batch.offsets == [0, 2] and batch.pairs == [[[0, 1]]]
    for i, n in enumerate(lengths):
        positions = batch.response_index[i, :n].tolist()
        assert positions == list(range(p - 1, p - 1 + n))
        # the token each position predicts is exactly the response
        assert [seqs[i][j + 1] for j in positions] == seqs[i][p:]
    assert batch.ref_logps.tolist() == [-1.0, -2.0]
    empty = collate_dpo(table, [], pad_id=0)
    assert empty.kinds == [] and empty.mask.sum().item() == 0


def test_candidate_table_and_reference_column_round_trip(tmp_path, tiny_tokenizer):
    ranking = {"prompt": "sort\ncab", "responses": ["cab", "abc", "acb"], "ranking": [1, 2, 0]}
    pair = {"prompt": "reverse\nab", "responses": ["ba", "ab"], "ranking": [0, 1]}  # one format per file
    table = load(tmp_path, tiny_tokenizer, [ranking, pair]).train
    flat = candidate_table(table)
    assert flat.num_rows == 5
    seqs = [s for row in table.column("sequences").to_pylist() for s in row]
    assert [p + r for p, r in zip(flat.column("prompt_ids").to_pylist(), flat.column("response_ids").to_pylist())] \
        == seqs
    added = with_reference(table, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert added.column(REF_COLUMN).to_pylist() == [[1.0, 2.0, 3.0], [4.0, 5.0]]
    with pytest.raises(ValueError, match="4 sums for 5 candidates"):
        with_reference(table, [1.0] * 4)


@pytest.mark.parametrize("preset", ["tiny", "llama", "chatml"])
def test_objective_loss_matches_plain_transformers_logprobs(tmp_path, preset):
    """On the three chat families (Llama: end of turn is not EOS and no pad token; ChatML: a newline after the
    end of turn): each candidate's response tokens end with the end of turn, and the loss is DPO's by hand."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.config import ModelConfig
    from rlhf_ray.models.chat import end_of_turn_ids
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.models.tiny import resolve_model_path

    tiny_model_path = resolve_model_path(f"tiny:{preset}")
    tiny_tokenizer = load_tokenizer(ModelConfig(path=tiny_model_path))
    ranking = {"prompt": "sort\ncab", "responses": ["cab", "abc", "acb"], "ranking": [1, 2, 0]}
    pair = {"prompt": "reverse\nab", "responses": ["ab", "ba"], "ranking": [1, 0]}  # one format per file
    table = load(tmp_path, tiny_tokenizer, [ranking, pair]).train
    ref = [-3.0, -4.0, -5.0, -6.0, -7.0]
    table = with_reference(table, ref)
    end_of_turn = end_of_turn_ids(tiny_tokenizer)[0]
    for prompt, seqs in zip(table.column("prompt_ids").to_pylist(), table.column("sequences").to_pylist()):
        assert all(end_of_turn in seq[len(prompt):] for seq in seqs), (preset, seqs)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    logps = []
    for prompt, seqs in zip(table.column("prompt_ids").to_pylist(), table.column("sequences").to_pylist()):
        for seq in seqs:
            ids = torch.tensor([seq])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            logps.append(lp[torch.arange(len(seq) - 1), ids[0, 1:]][len(prompt) - 1:].sum().item())
    objective = DPOObjective("sigmoid", beta=0.5)
    batch = objective.micro_batch(table, [0, 1], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        out = objective.loss(model, batch)
        assert objective.logps(model, batch).tolist() == pytest.approx(logps, abs=1e-4)
    scores = torch.tensor(logps) - torch.tensor(ref)
    expected = row_loss(scores[:3], [(1, 2), (1, 0), (2, 0)], None, DPO_LOSSES["sigmoid"], 0.5) + \
        row_loss(scores[3:], [(1, 0)], None, DPO_LOSSES["sigmoid"], 0.5)
    assert out.loss_sum.item() == pytest.approx(expected.item(), abs=1e-4)
    assert out.count.item() == 2
    # SimPO needs no reference column; listwise changes only the ranking row
    simpo = DPOObjective("simpo", beta=2.0, gamma=0.5)
    assert simpo.micro_batch(table.drop_columns([REF_COLUMN]), [0], 0).ref_logps is None
    with pytest.raises(ValueError, match="needs the reference logprobs column"):
        objective.micro_batch(table.drop_columns([REF_COLUMN]), [0], 0)


# -- config -----------------------------------------------------------------------------------------------

def dpo(*overrides: str) -> DPOConfig:
    return load_config(DPOConfig, None, ["data.train=feedback.jsonl", *overrides])


def test_dpo_config_defaults_and_reference():
    cfg = dpo("model.path=runs/sft/model")
    assert (cfg.loss.type, cfg.loss.beta, cfg.loss.ranking) == ("sigmoid", 0.1, "pairs")
    assert cfg.reference_model.path == "runs/sft/model" and cfg.loss.needs_reference
    assert dpo("reference.path=other").reference_model.path == "other"
    assert not dpo("loss.type=simpo").loss.needs_reference
    assert dpo("reference.placement.gpus=0.5").reference.gpus_per_actor == 0.5
    assert dpo().reference.gpus_per_actor == 1.0


@pytest.mark.parametrize("overrides, message", [
    (("loss.type=ipo", "loss.ranking=listwise"), "loss.ranking=listwise: IPO has no listwise form"),
    (("loss.type=ipo", "loss.label_smoothing=0.1"), "loss.label_smoothing: IPO has no label smoothing"),
    (("loss.label_smoothing=0.5",), "loss.label_smoothing"),
    (("loss.beta=0",), "loss.beta"),
    (("eval.max_new_tokens=null",), "eval.max_new_tokens: DPO needs a number"),
])
def test_dpo_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        dpo(*overrides)
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config(DPOConfig, None, [])


def test_the_cli_knows_the_dpo_stage():
    assert STAGE_CONFIGS["dpo"] is DPOConfig
    args = build_parser().parse_args(["dpo", "configs/tiny-cpu/dpo.yaml", "loss.type=simpo"])
    assert (args.command, args.overrides) == ("dpo", ["loss.type=simpo"])


def test_pipeline_mode_dpo_needs_only_the_sft_and_dpo_sections():
    from rlhf_ray.config import PipelineConfig

    cfg = load_config(PipelineConfig, None, ["sft.data.train=sft.jsonl", "mode=dpo", "dpo.data.train=fb.jsonl"])
    assert cfg.mode == "dpo" and cfg.rlhf is None and cfg.dpo.data.train == "fb.jsonl"
    # an error inside the section names its key
    with pytest.raises(ConfigError, match="dpo.loss.type: expected one of 'sigmoid', 'ipo', 'simpo', got 'kto'"):
        load_config(PipelineConfig, None, ["sft.data.train=s.jsonl", "mode=dpo", "dpo.data.train=f.jsonl",
                                           "dpo.loss.type=kto"])
    with pytest.raises(ConfigError, match="dpo: required with mode=dpo"):
        load_config(PipelineConfig, None, ["sft.data.train=sft.jsonl", "mode=dpo"])
    with pytest.raises(ConfigError, match="rlhf: required with mode=rm\\+rlhf"):
        load_config(PipelineConfig, None, ["sft.data.train=sft.jsonl", "dpo.data.train=fb.jsonl"])
    # the shipped tiny pipeline runs either way
    shipped = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu" / "pipeline.yaml"
    assert load_config(PipelineConfig, shipped, ["mode=dpo"]).dpo.run.name == "pipeline-dpo"
    assert load_config(PipelineConfig, shipped).mode == "rm+rlhf"


def test_pipeline_table_compares_the_sft_and_dpo_policies(tmp_path):
    from rlhf_ray.stages.pipeline import before_after_table
    from rlhf_ray.stages.supervised import StageResult

    records = [{"step": 0, "split": "eval", "accuracy": 0.5, "preference_accuracy": 0.5, "reward_margin": 0.0},
               {"step": 5, "split": "train", "loss": 0.3},
               {"step": 10, "split": "eval", "accuracy": 0.75, "preference_accuracy": 1.0, "reward_margin": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = before_after_table({"sft": StageResult(tmp_path, tmp_path, {}), "dpo": StageResult(tmp_path, tmp_path, {})})
    lines = table.splitlines()
    assert lines[2].split() == ["metric", "SFT", "DPO"]
    assert lines[3].split() == ["accuracy", "0.5000", "0.7500"]
    assert lines[4].split() == ["preference_accuracy", "0.5000", "1.0000"]


def test_implicit_reward_metrics_by_hand():
    from rlhf_ray.stages.dpo import implicit_reward_metrics

    # row 0: a pair, logps [-2, -3], ref [-3, -2]: rewards 0.5 * [1, -1] -> right, gap 1; the policy prefers it too
    # row 1: ranking pairs (0,1), (0,2), (1,2), logps [-1, -1, -4], ref [-1, -2, -2]: Δ = [0, 1, -2]
    #   rewards 0.5 * Δ: (0,1) wrong (-0.5), (0,2) right (1.0), (1,2) right (1.5); own logps: tie, right, right
    out = implicit_reward_metrics([[-2.0, -3.0], [-1.0, -1.0, -4.0]], [[-3.0, -2.0], [-1.0, -2.0, -2.0]],
                                  [[2, 2], [1, 1, 1]], [[[0, 1]], [[0, 1], [0, 2], [1, 2]]], 0.5, False)
    assert out["preference_accuracy"] == pytest.approx(3 / 4)
    assert out["reward_margin"] == pytest.approx((1.0 - 0.5 + 1.0 + 1.5) / 4)
    assert out["logp_accuracy"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    # SimPO: rewards β logp / length, no reference
    simpo = implicit_reward_metrics([[-2.0, -3.0]], None, [[1, 3]], [[[0, 1]]], 2.0, True)
    assert simpo["preference_accuracy"] == 0.0 and simpo["reward_margin"] == pytest.approx(2 * (-2.0 + 1.0))
