"""The three tiny model families (qwen2, llama, chatml) and what differs between them: the end of turn, the
SFT loss mask over it, and the reward model scoring RLHF samples exactly as it was trained.

Every check runs on the real built tokenizers and models (no stand-ins), so a family whose end of turn is not
the EOS (llama, chatml), that has no pad token (llama), or whose pad is the EOS (chatml) is tested as such.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlhf_ray.config import ModelConfig, RewardConfig, RewardDataConfig
from rlhf_ray.data.collate import collate_preferences
from rlhf_ray.data.errors import ChatTemplateError
from rlhf_ray.data.loading import Record
from rlhf_ray.data.preference import load_feedback, to_table
from rlhf_ray.data.prompts import load_prompts
from rlhf_ray.data.sft import Conversation, encode, render, tokenize_conversation
from rlhf_ray.models.chat import end_of_turn_ids
from rlhf_ray.models.loading import load_reward_model, load_tokenizer
from rlhf_ray.models.tiny import resolve_model_path
from rlhf_ray.roles.objectives import RewardObjective
from rlhf_ray.roles.scorers import RewardActor
from rlhf_ray.rollout.schema import ROLLOUT_SCHEMA

FAMILIES = ["tiny", "llama", "chatml"]
# preset -> (architecture, bos, eos, pad as loaded by the project, end of turn, tied embeddings)
EXPECTED = {
    "tiny": ("Qwen2ForCausalLM", "<|bos|>", "<|end|>", "<|pad|>", "<|end|>", True),
    "llama": ("LlamaForCausalLM", "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", "<|eot_id|>", True),
    "chatml": ("Qwen2ForCausalLM", None, "<|endoftext|>", "<|endoftext|>", "<|im_end|>", False),
}
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "reverse\nab"},
        {"role": "assistant", "content": "ba"}]
RENDERED = {
    "tiny": "<|system|>be brief<|end|><|user|>hi<|end|><|assistant|>yo<|end|><|user|>reverse\nab<|end|>"
            "<|assistant|>ba<|end|>",
    "llama": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
             "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
             "\n\nyo<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nreverse\nab<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\nba<|eot_id|>",
    "chatml": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo"
              "<|im_end|>\n<|im_start|>user\nreverse\nab<|im_end|>\n<|im_start|>assistant\nba<|im_end|>\n",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def path(family) -> str:
    return resolve_model_path(f"tiny:{family}")


@pytest.fixture(scope="module")
def tok(path):
    """The tokenizer as the project loads it (`load_tokenizer`: eos stands in for a missing pad)."""
    return load_tokenizer(ModelConfig(path=path))


# -- the families as built ------------------------------------------------------------------------------------

def test_family_loads_with_its_tokens_and_shape(family, path, tok):
    arch, bos, eos, pad, _, tied = EXPECTED[family]
    raw = AutoTokenizer.from_pretrained(path)
    assert (raw.bos_token, raw.eos_token) == (bos, eos)
    assert raw.pad_token == (None if family == "llama" else pad)  # llama ships no pad token
    assert tok.pad_token == pad
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == [arch] and config.tie_word_embeddings is tied
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == arch
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 0.7e6
    assert len(raw) == config.vocab_size and max(raw.get_vocab().values()) < config.vocab_size
    # The generation config names the EOS only: stopping at the end of turn is the caller's job.
    assert json.loads(Path(path, "generation_config.json").read_text())["eos_token_id"] == raw.eos_token_id


def test_every_letter_is_one_token_and_special_tokens_are_atomic(tok):
    ids = tok.encode(string.ascii_lowercase, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == list(string.ascii_lowercase)
    for token in tok.added_tokens_decoder.values():
        assert tok.convert_ids_to_tokens(tok.encode(token.content, add_special_tokens=False)) == [token.content]


def test_chat_template_renders_the_family_layout(family, tok):
    assert render(tok, CHAT) == RENDERED[family]
    prompt = render(tok, CHAT[:4], generation_prompt=True)
    assert RENDERED[family].startswith(prompt) and prompt.endswith(
        {"tiny": "<|assistant|>", "llama": "<|end_header_id|>\n\n", "chatml": "<|im_start|>assistant\n"}[family])
    assert encode(tok, prompt).count(tok.bos_token_id) == (1 if family == "llama" else 0)


# -- end of turn ----------------------------------------------------------------------------------------------

def test_end_of_turn_ids_come_from_the_template(family, tok):
    _, _, eos, _, end_of_turn, _ = EXPECTED[family]
    want = [end_of_turn] if end_of_turn == eos else [end_of_turn, eos]
    assert tok.convert_ids_to_tokens(list(end_of_turn_ids(tok))) == want


@pytest.fixture()
def chatml_tok():
    return copy.deepcopy(AutoTokenizer.from_pretrained(resolve_model_path("tiny:chatml")))


def test_end_of_turn_without_a_chat_template_is_an_error(chatml_tok):
    chatml_tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        end_of_turn_ids(chatml_tok)


def test_end_of_turn_with_a_template_that_fails_or_drops_the_content_is_an_error(chatml_tok):
    chatml_tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="fails on a plain user \\+ assistant.*roles must alternate"):
        end_of_turn_ids(chatml_tok)
    chatml_tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ChatTemplateError, match="does not write the assistant message's content"):
        end_of_turn_ids(chatml_tok)


def test_a_template_without_an_end_of_turn_token_leaves_the_eos(chatml_tok):
    chatml_tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert end_of_turn_ids(chatml_tok) == (chatml_tok.eos_token_id,)


# -- SFT: the loss covers each assistant turn's end of turn ---------------------------------------------------

def masked_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of 1s."""
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_sft_loss_mask_covers_the_end_of_turn_of_every_assistant_turn(family, tok):
    example = tokenize_conversation(tok, Conversation(tuple(CHAT), {}), Record("chat.jsonl", 1, "line", {}))
    end_of_turn = end_of_turn_ids(tok)[0]
    runs = masked_runs(example.loss_mask)
    assistant = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert len(runs) == len(assistant)
    for (start, end), content in zip(runs, assistant):
        ids = example.input_ids[start:end]
        assert ids.count(end_of_turn) == 1, tok.convert_ids_to_tokens(ids)
        at = ids.index(end_of_turn)
        assert tok.decode(ids[:at]) == content
        # Only ChatML writes something after the end of turn ("\n"), and it is learned too.
        assert tok.decode(ids[at + 1:]) == ("\n" if family == "chatml" else "")


# -- prompts and the reward model -----------------------------------------------------------------------------

PROMPT_ROWS = [{"prompt": "reverse\nabc", "task": "reverse"},
               {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort\ncab"}]},
               {"messages": [{"role": "user", "content": "reverse\nxyz"}, {"role": "assistant", "content": "zyx"}]}]
RESPONSES = ["cba", "abc", "zyxw"]


@pytest.fixture(scope="module")
def prompt_table(tmp_path_factory, tok) -> pa.Table:
    source = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in PROMPT_ROWS))
    table, _ = load_prompts(str(source), tok, max_prompt_length=128)
    return table


def test_prompt_table_keeps_the_messages_its_ids_render(tok, prompt_table):
    rows = prompt_table.to_pylist()
    assert [r["prompt_messages"][-1]["content"] for r in rows] == ["reverse\nabc", "sort\ncab", "reverse\nxyz"]
    assert rows[1]["prompt_messages"][0] == {"role": "system", "content": "be brief"}
    for row in rows:
        assert row["prompt_ids"] == encode(tok, render(tok, row["prompt_messages"], generation_prompt=True))


def rollouts_like_the_generator(tok, prompt_table: pa.Table) -> pa.Table:
    """One row per prompt and ending: stopped at the end of turn, at the EOS (== pad for chatml), and cut
    off at max_new_tokens without either; response_text decoded as the generator decodes it."""
    end_of_turn, eos = end_of_turn_ids(tok)[0], tok.eos_token_id
    prompts = prompt_table.to_pylist()
    columns: dict[str, list] = {name: [] for name in ROLLOUT_SCHEMA.names}
    for i, (prompt, response) in enumerate(zip(prompts, RESPONSES)):
        for ending, finish in (([end_of_turn], "stop"), ([eos], "stop"), ([], "length")):
            ids = encode(tok, response) + ending
            row = {"prompt_index": i, "sample_index": 0, "group": i, "response_ids": ids,
                   "rollout_logprobs": [0.0] * len(ids), "finish_reason": finish,
                   "response_text": tok.decode(ids, skip_special_tokens=True), **prompt}
            for name in ROLLOUT_SCHEMA.names:
                columns[name].append(row[name])
    return pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, family, path, tok):
    """A reward model as the RM stage makes one from the policy (random score head, saved with the tokenizer
    the learner loaded), for the family."""
    out = tmp_path_factory.mktemp(f"rm-{family}")
    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(path=path), torch.float32, pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # scores that differ visibly from token to token
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rm_training_scores(rm_dir, prompt_table: pa.Table, rollouts: pa.Table, tmp_path) -> list[float]:
    """Each rollout as a rating row of an RM data file, scored the way RM training and evaluation score it:
    data.preference rows -> collate_preferences -> RewardObjective.rewards on the model load_reward_model loads."""
    tok = load_tokenizer(ModelConfig(path=str(rm_dir)))
    messages = rollouts.column("prompt_messages").to_pylist()
    source = tmp_path / "ratings.jsonl"
    source.write_text("".join(json.dumps({"prompt": m, "response": r, "score": 3}) + "\n"
                              for m, r in zip(messages, rollouts.column("response_text").to_pylist())))
    examples, _ = load_feedback(str(source), RewardDataConfig(train=str(source), format="rating"), tok)
    model = load_reward_model(ModelConfig(path=str(rm_dir)), torch.float32, pad_token_id=tok.pad_token_id).eval()
    batch = collate_preferences(to_table(examples), list(range(len(examples))), tok.pad_token_id)
    with torch.no_grad():
        return RewardObjective().rewards(model, batch).tolist()


def test_reward_actor_scores_what_rm_training_scores(family, tok, prompt_table, reward_model_dir, tmp_path):
    rollouts = rollouts_like_the_generator(tok, prompt_table)
    want = rm_training_scores(reward_model_dir, prompt_table, rollouts, tmp_path)
    actor = RewardActor(RewardConfig(model=str(reward_model_dir), normalize=False), "cpu",
                        micro_batch_size=4)
    got = actor.score(rollouts, list(range(rollouts.num_rows))).column("score").to_pylist()
    assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-5
    assert max(want) - min(want) > 0.1  # the head tells the conversations apart, so the check has teeth

    # What the actor read is the RM training rendering (BOS once for llama, the "\n" after <|im_end|>)...
    sequences = actor.model_inputs(rollouts)
    for seq, messages, text in zip(sequences, rollouts.column("prompt_messages").to_pylist(),
                                   rollouts.column("response_text").to_pylist()):
        assert tok.decode(seq) == render(tok, [*messages, {"role": "assistant", "content": text}])
    # ...which for ChatML is not prompt_ids + response_ids (never ends with the "\n" the RM was trained on).
    joined = [p + r for p, r in zip(rollouts.column("prompt_ids").to_pylist(),
                                    rollouts.column("response_ids").to_pylist())]
    assert (joined[0] == sequences[0]) is (family != "chatml")


def test_reward_actor_needs_the_prompt_messages(tok, prompt_table, reward_model_dir):
    rollouts = rollouts_like_the_generator(tok, prompt_table)
    empty = pa.array([[]] * rollouts.num_rows, ROLLOUT_SCHEMA.field("prompt_messages").type)
    rollouts = rollouts.set_column(rollouts.schema.get_field_index("prompt_messages"), "prompt_messages", empty)
    actor = RewardActor(RewardConfig(model=str(reward_model_dir)), "cpu")
    with pytest.raises(ValueError, match="rollout row 0: prompt_messages is empty"):
        actor.score(rollouts, [0])
