"""`rlhf-ray label` and `label-summary` from the command line, and where annotators' tokens come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_ray.cli import main
from rlhf_ray.label.config import LabelServerConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.label.items import LabelItem
from rlhf_ray.label.judgements import make_record
from rlhf_ray.label.server import load_tokens
from rlhf_ray.label.store import JudgementStore


def test_label_with_a_missing_candidates_file_stops_before_serving(tmp_path, capsys):
    code = main(["label", f"candidates={tmp_path / 'nope.jsonl'}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "rlhf-ray label: error:" in err and "nope.jsonl: file not found" in err


def test_label_config_errors_exit_2_with_the_key(capsys):
    assert main(["label", "mode=rating"]) == 2
    assert "give candidates" in capsys.readouterr().err


def test_label_summary_without_judgements(tmp_path, capsys):
    assert main(["label-summary", "candidates=c.jsonl", f"output_dir={tmp_path}"]) == 2
    assert "no judgements yet" in capsys.readouterr().err


def test_label_summary_prints_and_saves_the_ab_win_rate(tmp_path, capsys):
    store = JudgementStore(tmp_path, "ab")
    for i, choice in enumerate([0, 0, 0, 1, "tie"]):
        item = LabelItem(f"i{i}", f"p{i}", (f"a{i}", f"b{i}"), ("rlhf", "sft"))
        store.append(make_record(item, "alice", "ab", {"choice": choice}, [0, 1]))
    code = main(["label-summary", "mode=ab", "candidates=c.jsonl", "ab.name_a=rlhf", "ab.name_b=sft",
                 f"output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "A/B: rlhf wins 3, sft wins 1, ties 1, both bad 0" in out
    assert "win rate of rlhf over sft: 70.0%" in out and "alice" in out
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["ab"]["rate"] == 0.7 and saved["annotators"]["alice"]["judged"] == 5


def test_label_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    out = capsys.readouterr().out
    assert "server.annotators" in out and "ab.ties" in out and "rating_scale" in out


def test_tokens_from_config_and_file_are_merged(tmp_path):
    (tmp_path / "tokens.yaml").write_text("bob: bob-token-0123456789\n")
    server = load_config(LabelServerConfig, None, ["annotators={alice: alice-token-0123456789}",
                                                   f"tokens_file={tmp_path / 'tokens.yaml'}"])
    assert load_tokens(server) == ({"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}, False)


@pytest.mark.parametrize("text, message", [
    ("- just a list\n", "must map annotator names to tokens"),
    ("bob: short\n", "at least 16 characters"),
    ("alice: other-token-0123456789\n", "another token than server.annotators"),
    ("carol: alice-token-0123456789\n", "share a token"),
    ("{unclosed: [\n", "not valid YAML"),
])
def test_bad_tokens_files_are_named(tmp_path, text, message):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    server = load_config(LabelServerConfig, None, ["annotators={alice: alice-token-0123456789}",
                                                   f"tokens_file={path}"])
    with pytest.raises(ConfigError, match=message) as err:
        load_tokens(server)
    assert str(path) in str(err.value)


def test_without_tokens_one_random_token_is_made(tmp_path):
    tokens, generated = load_tokens(LabelServerConfig())
    assert generated and list(tokens) == ["local"] and len(tokens["local"]) >= 16
    assert load_tokens(LabelServerConfig())[0] != tokens
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokens(LabelServerConfig(tokens_file=str(Path(tmp_path) / "missing.yaml")))
