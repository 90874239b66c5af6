"""Synthetic tasks (answers, grading, seeded rows, disjoint splits) and the offline tiny model and tokenizer."""

from __future__ import annotations

import json
import random
import string

import pytest

from rlhf_ray.data import synthetic
from rlhf_ray.data.synthetic import (TASKS, Task, corpus, get_task, is_correct, make_rows, score_answer, solve,
                                     write_jsonl, write_sft_dataset)
from rlhf_ray.models import tiny
from rlhf_ray.models.tiny import PRESETS, build_tokenizer, ensure_tiny_model, resolve_model_path

# -- tasks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task, task_input, answer", [
    ("reverse", "abc", "cba"),
    ("reverse", "level", "level"),
    ("sort", "dcba", "abcd"),
    ("sort", "banana", "aaabnn"),
    ("add", "12+30", "42"),
    ("add", "0+0", "0"),
    ("add", "99+99", "198"),
    ("add", "07+3", "10"),
])
def test_solve(task, task_input, answer):
    assert solve(task, task_input) == answer


@pytest.mark.parametrize("task, task_input, response, score", [
    ("reverse", "abc", "cba", 1.0),
    ("reverse", "abc", "  cba\n", 1.0),   # surrounding whitespace is not held against the answer
    ("reverse", "abc", "cbx", 2 / 3),
    ("reverse", "abc", "cb", 2 / 3),      # too short: divided by the longer length
    ("reverse", "abc", "cbaa", 3 / 4),    # too long, likewise
    ("reverse", "abc", "abc", 1 / 3),     # position by position: only the middle b matches
    ("reverse", "abc", "", 0.0),
    ("sort", "cab", "abc", 1.0),
    ("add", "12+30", "42", 1.0),
    ("add", "12+30", "24", 0.0),
    ("add", "50+50", "10", 2 / 3),
])
def test_score_answer(task, task_input, response, score):
    assert score_answer(task, task_input, response) == pytest.approx(score)


@pytest.mark.parametrize("response, correct", [("cba", True), (" cba \n", True), ("cb", False),
                                               ("cbaa", False), ("CBA", False), ("c b a", False)])
def test_is_correct(response, correct):
    assert is_correct("reverse", "abc", response) is correct


def test_score_is_one_exactly_when_correct():
    rng = random.Random(0)
    for row in make_rows(list(TASKS), 60, seed=1):
        wrong = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(4))
        for response in (row["output"], wrong, row["output"][:-1]):
            assert (score_answer(row["task"], row["input"], response) == 1.0) == \
                is_correct(row["task"], row["input"], response)
            assert 0.0 <= score_answer(row["task"], row["input"], response) <= 1.0


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown synthetic task 'copy'; valid tasks: add, reverse, sort"):
        get_task("copy")
    with pytest.raises(ValueError, match="copy"):
        solve("copy", "abc")


# -- rows -------------------------------------------------------------------------------------------------

def test_make_rows_is_deterministic_for_a_seed():
    assert make_rows(["reverse", "add"], 50, seed=3) == make_rows(["reverse", "add"], 50, seed=3)
    assert make_rows(["reverse", "add"], 50, seed=3) != make_rows(["reverse", "add"], 50, seed=4)


def test_make_rows_are_distinct_correct_and_cycle_over_tasks():
    rows = make_rows(["reverse", "sort", "add"], 300, seed=0)
    assert len(rows) == 300
    assert len({(r["task"], r["input"]) for r in rows}) == 300
    assert [r["task"] for r in rows[:6]] == ["reverse", "sort", "add"] * 2
    for r in rows:
        assert set(r) == {"instruction", "input", "output", "task"}
        assert r["instruction"] == r["task"] and r["output"] == solve(r["task"], r["input"])
        if r["task"] != "add":
            assert 3 <= len(r["input"]) <= 6 and set(r["input"]) <= set(string.ascii_lowercase)


def test_make_rows_skips_excluded_inputs():
    first = make_rows(["reverse"], 20, seed=0)
    again = make_rows(["reverse"], 20, seed=0, exclude=[(r["task"], r["input"]) for r in first[:5]])
    assert not {r["input"] for r in first[:5]} & {r["input"] for r in again}
    assert len(again) == 20


def test_make_rows_fails_when_the_input_space_is_too_small(monkeypatch):
    monkeypatch.setitem(TASKS, "coin", Task("coin", lambda rng: rng.choice("ht"), str))
    assert len(make_rows(["coin"], 2, seed=0)) == 2
    with pytest.raises(ValueError, match="could not draw 3 distinct rows for tasks \\['coin'\\]"):
        make_rows(["coin"], 3, seed=0)


def test_write_sft_dataset_eval_and_train_are_disjoint(tmp_path):
    paths = write_sft_dataset(tmp_path, n_train=400, n_eval=60, seed=1)
    assert set(paths) == {"train", "eval"}
    read = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert len(read["train"]) == 400 and len(read["eval"]) == 60
    train = {(r["task"], r["input"]) for r in read["train"]}
    evals = {(r["task"], r["input"]) for r in read["eval"]}
    assert len(train) == 400 and len(evals) == 60
    assert not train & evals
    assert {r["task"] for r in read["eval"]} == {"reverse", "sort", "add"}
    assert not list(tmp_path.glob("*.tmp*"))


def test_write_sft_dataset_is_reproducible(tmp_path):
    a = write_sft_dataset(tmp_path / "a", tasks=("add",), n_train=30, n_eval=10, seed=2)
    b = write_sft_dataset(tmp_path / "b", tasks=("add",), n_train=30, n_eval=10, seed=2)
    c = write_sft_dataset(tmp_path / "c", tasks=("add",), n_train=30, n_eval=10, seed=3)
    assert a["train"].read_bytes() == b["train"].read_bytes() != c["train"].read_bytes()
    assert a["eval"].read_bytes() == b["eval"].read_bytes()


def test_write_jsonl_keeps_unicode(tmp_path):
    path = write_jsonl([{"a": "é"}, {"b": [1, 2]}], tmp_path / "sub" / "x.jsonl")
    assert path.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": [1, 2]}\n'


def test_corpus_covers_printable_characters():
    text = corpus(30)
    assert len(text) == 31 and text[-1] == string.printable


# -- the tiny model and tokenizer -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built():
    return build_tokenizer()


@pytest.fixture(scope="module")
def loaded(tiny_model_path):
    """The tokenizer the way every consumer (learner, vLLM) loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_building_the_tokenizer_twice_gives_identical_vocab(built):
    again = build_tokenizer()
    assert again.get_vocab() == built.get_vocab()
    assert again.backend_tokenizer.to_str() == built.backend_tokenizer.to_str()


@pytest.mark.parametrize("which", ["built", "loaded"])
def test_every_lowercase_letter_is_its_own_token(which, request):
    tok = request.getfixturevalue(which)
    ids = tok.encode(string.ascii_lowercase, add_special_tokens=False)
    assert len(ids) == 26 and len(set(ids)) == 26
    assert [tok.decode([i]) for i in ids] == list(string.ascii_lowercase)
    for word in ("hello", "zzyzx", "banana"):
        assert tok.convert_ids_to_tokens(tok.encode(word, add_special_tokens=False)) == list(word)


@pytest.mark.parametrize("which", ["built", "loaded"])
def test_chat_template_renders_the_prompt(which, request):
    tok = request.getfixturevalue(which)
    messages = [{"role": "user", "content": "reverse\nabc"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|user|>reverse\nabc<|end|><|assistant|>"
    full = messages + [{"role": "assistant", "content": "cba"}]
    assert tok.apply_chat_template(full, tokenize=False) == "<|user|>reverse\nabc<|end|><|assistant|>cba<|end|>"


def test_special_tokens(loaded):
    assert loaded.pad_token == "<|pad|>" and loaded.eos_token == "<|end|>" and loaded.bos_token == "<|bos|>"
    for token in tiny.SPECIAL_TOKENS:
        ids = loaded.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and loaded.convert_ids_to_tokens(ids) == [token]


def test_loaded_tokenizer_fits_the_model_and_matches_the_built_one(loaded, built, tiny_model_path):
    """transformers maps model_type qwen2 to Qwen2Tokenizer whatever tokenizer_config.json says; the tokenizer
    it loads must still have no id beyond the model's embedding and tokenize task text as built."""
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(tiny_model_path).vocab_size
    assert len(loaded) == len(built) == vocab_size
    assert max(loaded.get_vocab().values()) < vocab_size
    assert max(loaded.encode("<|endoftext|> <|unk|>", add_special_tokens=False)) < vocab_size
    for text in corpus(300, seed=9)[:-1] + ["<|user|>sort\nqwe<|end|><|assistant|>eqw<|end|>"]:
        assert loaded.encode(text, add_special_tokens=False) == built.encode(text, add_special_tokens=False)


def test_resolve_model_path_loads_with_auto_classes(tiny_model_path, loaded):
    import torch
    from transformers import AutoModelForCausalLM

    assert resolve_model_path("tiny:tiny") == tiny_model_path  # cached: the same directory every time
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ids = torch.tensor([loaded.encode("reverse\nabc")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.config.hidden_size == PRESETS["tiny"]["hidden_size"]
    assert model.config.pad_token_id == loaded.pad_token_id and model.config.eos_token_id == loaded.eos_token_id
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 0.7e6


def test_resolve_model_path_passes_other_paths_through():
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_path("/models/mine") == "/models/mine"


def test_unknown_preset_names_the_valid_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_RAY_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"'tiny:huge'.*preset one of tiny, small, base"):
        resolve_model_path("tiny:huge")
    with pytest.raises(ValueError, match=r"unknown tiny model preset 'huge'; valid presets: tiny, small, base"):
        ensure_tiny_model("huge")
    with pytest.raises(ValueError, match=r"non-negative integer seed"):
        resolve_model_path("tiny:tiny@abc")
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").glob("*huge*"))


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_RAY_CACHE", str(tmp_path))
    assert tiny.cache_dir() == tmp_path
    assert synthetic.TASKS is TASKS
