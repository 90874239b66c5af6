"""Scorers as plain Python classes (no Ray): reference log-probabilities against a direct transformers
computation, rule rewards, and a reward model with its normalisation stats."""

from __future__ import annotations

import json
import math
import warnings

import pyarrow as pa
import pytest
import torch

from rlhf_ray.config import ModelConfig, RewardConfig, RewardFunctionConfig
from rlhf_ray.rewards import RewardFunctionError
from rlhf_ray.roles.scorers import ReferenceActor, RewardActor, response_logprobs
from rlhf_ray.rollout.schema import ROLLOUT_SCHEMA

TASK_SCORE = "rlhf_ray.rewards.tasks:task_score"
# (prompt text, response text, task input): ragged prompts, one empty response.
SAMPLES = [("reverse\nabc", "cba", "abc"), ("reverse\nhello", "olleh", "hello"), ("reverse\nxy", "", "xy"),
           ("reverse\nabcd", "dcxa", "abcd"), ("reverse\nq", "qq", "q")]


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def table(tiny_tokenizer) -> pa.Table:
    tok = tiny_tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p, _, _ in SAMPLES]
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    response_ids = [tok(r, add_special_tokens=False).input_ids + ([tok.eos_token_id] if r else [])
                    for _, r, _ in SAMPLES]
    n = len(SAMPLES)
    return pa.Table.from_pydict({
        "prompt_index": list(range(n)), "sample_index": [0] * n, "group": list(range(n)),
        "prompt_ids": prompt_ids, "response_ids": response_ids,
        "rollout_logprobs": [[0.0] * len(r) for r in response_ids], "finish_reason": ["stop"] * n,
        "prompt_text": prompts, "response_text": [r for _, r, _ in SAMPLES],
        "metadata": [json.dumps({"task": "reverse", "input": x}) for _, _, x in SAMPLES],
        "prompt_messages": [[{"role": "user", "content": p}] for p, _, _ in SAMPLES],
    }, schema=ROLLOUT_SCHEMA)


def direct_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """log p(response token k | prompt, response[:k]) from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [logp[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(response)]


def test_table_has_an_empty_response_and_ragged_prompts(table):
    assert [] in table.column("response_ids").to_pylist()
    assert len({len(p) for p in table.column("prompt_ids").to_pylist()}) > 1


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_response_logprobs_match_a_direct_computation(model, table, tiny_tokenizer, micro_batch_size):
    prompts, responses = table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()
    got = response_logprobs(model, prompts, responses, micro_batch_size, tiny_tokenizer.pad_token_id, "cpu")
    assert [len(g) for g in got] == [len(r) for r in responses]
    for g, p, r in zip(got, prompts, responses):
        assert g == pytest.approx(direct_logprobs(model, p, r), abs=1e-5)


def test_response_logprobs_do_not_depend_on_the_micro_batch(model, table, tiny_tokenizer):
    prompts, responses = table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()
    pad = tiny_tokenizer.pad_token_id
    one = response_logprobs(model, prompts, responses, 1, pad, "cpu")
    three = response_logprobs(model, prompts, responses, 3, pad, "cpu")
    for a, b in zip(one, three):
        assert a == pytest.approx(b, abs=1e-5)


def test_reference_actor_scores_the_given_rows(model, table):
    actor = ReferenceActor(ModelConfig(path="tiny:tiny"), 2, "cpu")
    rows = [3, 0, 2]
    out = actor.logprobs(table, rows)
    assert out.column("row").to_pylist() == rows
    prompts, responses = table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()
    for row, values in zip(rows, out.column("values").to_pylist()):
        assert values == pytest.approx(direct_logprobs(model, prompts[row], responses[row]), abs=1e-5)


# -- rule rewards ------------------------------------------------------------------------------------------

def rule_actor(weight: float = 2.0, clip: float | None = None) -> RewardActor:
    cfg = RewardConfig(functions=(RewardFunctionConfig(TASK_SCORE, weight),), clip=clip)
    return RewardActor(cfg, "cpu")


CHECKER = [1.0, 1.0, 0.0, 0.75, 0.5]  # score_answer of SAMPLES: right, right, empty, 3 of 4, 1 of 2


def test_rule_reward_is_the_weighted_checker_score(table):
    out = rule_actor(2.0).score(table, [4, 0, 3, 2])
    assert out.column_names == ["row", "score", "score/task_score"]
    assert out.column("row").to_pylist() == [4, 0, 3, 2]
    assert out.column("score/task_score").to_pylist() == pytest.approx([0.5, 1.0, 0.75, 0.0])
    assert out.column("score").to_pylist() == pytest.approx([1.0, 2.0, 1.5, 0.0])


def test_rule_reward_clip(table):
    out = rule_actor(2.0, clip=1.2).score(table, list(range(5)))
    assert out.column("score").to_pylist() == pytest.approx([min(2 * c, 1.2) for c in CHECKER])
    out = rule_actor(-4.0, clip=1.2).score(table, list(range(5)))
    assert out.column("score").to_pylist() == pytest.approx([max(-4 * c, -1.2) for c in CHECKER])
    assert out.column("score/task_score").to_pylist() == pytest.approx(CHECKER)  # components are not clipped


def test_a_bad_reward_function_path_fails_at_construction():
    cfg = RewardConfig(functions=(RewardFunctionConfig("rlhf_ray.rewards.tasks:nope"),))
    with pytest.raises(RewardFunctionError, match="nope"):
        RewardActor(cfg, "cpu")


# -- reward model -----------------------------------------------------------------------------------------

MEAN, STD = 0.25, 2.0


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_path, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_path, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():  # a head that gives scores well away from 0, so normalising visibly changes them
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    (out / "reward_stats.json").write_text(json.dumps({"mean": MEAN, "std": STD}))
    return out


def raw_scores(path, table) -> list[float]:
    """Each row scored alone (no padding) on its conversation rendered as in RM training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ray.data.preference import candidate_ids

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for m, r in zip(table.column("prompt_messages").to_pylist(), table.column("response_text").to_pylist()):
            out.append(model(input_ids=torch.tensor([candidate_ids(tok, m, r)])).logits[0, 0].item())
    return out


def test_reward_model_score_is_normalised_by_its_stats(reward_model_dir, table):
    raw = raw_scores(reward_model_dir, table)
    assert max(abs(r) for r in raw) > 0.1
    actor = RewardActor(RewardConfig(model=str(reward_model_dir)), "cpu", micro_batch_size=2)
    out = actor.score(table, list(range(5)))
    want = [(r - MEAN) / STD for r in raw]
    assert out.column("score").to_pylist() == pytest.approx(want, abs=1e-5)
    assert out.column("score/reward_model").to_pylist() == pytest.approx(want, abs=1e-5)


def test_reward_model_without_normalisation_gives_raw_scores(reward_model_dir, table):
    raw = raw_scores(reward_model_dir, table)
    cfg = RewardConfig(model=str(reward_model_dir), normalize=False)
    out = RewardActor(cfg, "cpu", micro_batch_size=3).score(table, list(range(5)))
    assert out.column("score").to_pylist() == pytest.approx(raw, abs=1e-5)


def test_reward_model_and_rules_are_summed_with_their_weights(reward_model_dir, table):
    raw = raw_scores(reward_model_dir, table)
    cfg = RewardConfig(model=str(reward_model_dir), model_weight=0.5,
                       functions=(RewardFunctionConfig(TASK_SCORE, 3.0),))
    out = RewardActor(cfg, "cpu").score(table, list(range(5)))
    want = [0.5 * (r - MEAN) / STD + 3.0 * c for r, c in zip(raw, CHECKER)]
    assert out.column("score").to_pylist() == pytest.approx(want, abs=1e-5)
    assert out.column_names == ["row", "score", "score/reward_model", "score/task_score"]


def test_a_non_finite_model_score_stays_non_finite_when_clipped_and_warns_once(reward_model_dir, table, monkeypatch):
    actor = RewardActor(RewardConfig(model=str(reward_model_dir), clip=1.0, functions=(
        RewardFunctionConfig(TASK_SCORE, 1.0),)), "cpu")
    monkeypatch.setattr(actor, "_model_scores", lambda rollouts: [math.nan, math.inf, -math.inf, 0.5][:rollouts.num_rows])
    with pytest.warns(RuntimeWarning, match=r"the reward model gave non-finite scores \(nan\) to 3 of 4 rollouts "
                                            r"\(batch rows \[0, 1, 2\]\)"):
        out = actor.score(table, [0, 1, 2, 3])
    scores = out.column("score").to_pylist()
    assert math.isnan(scores[0]) and scores[1] == math.inf and scores[2] == -math.inf  # never clipped to +-1
    assert scores[3] == pytest.approx(min(1.0, 0.5 + CHECKER[3]))  # finite totals are still clipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per actor and component
        assert math.isnan(actor.score(table, [0]).column("score")[0].as_py())


def test_a_nan_from_a_reward_function_is_passed_on_and_named(table):
    actor = rule_actor(1.0)
    actor.functions = [(TASK_SCORE, lambda p, r, m: [math.nan] + [1.0] * (len(r) - 1), 1.0)]
    with pytest.warns(RuntimeWarning, match=rf"reward function {TASK_SCORE.rpartition(':')[2]} gave non-finite"):
        out = actor.score(table, [2, 3])
    assert math.isnan(out.column("score")[0].as_py()) and out.column("score")[1].as_py() == 1.0
    assert math.isnan(out.column("score/task_score")[0].as_py())
