"""Choosing what people label: the ranking math on hand values, the config rules, and the item orders."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.label.config import LabelConfig
from rlhf_ray.label.items import load_items
from rlhf_ray.label.select import (
    ensemble_disagreement,
    item_uncertainty,
    margin_uncertainty,
    most_uncertain_first,
    order_by_uncertainty,
    pair_margins,
)


def test_pair_margins_of_every_pair():
    rewards = torch.tensor([[3.0, 1.0, 2.5]])  # [m=1, k=3]
    assert pair_margins(rewards).tolist() == [[2.0, 0.5, -1.5]]  # (0,1), (0,2), (1,2)
    assert pair_margins(torch.tensor([1.0, 4.0])).tolist() == [-3.0]


def test_margin_uncertainty_is_highest_near_zero():
    margins = torch.tensor([[2.0], [-0.25], [0.5], [-3.0]])  # [n=4, P=1]
    assert margin_uncertainty(margins).tolist() == [-2.0, -0.25, -0.5, -3.0]
    # a ranking item is as uncertain as its closest pair
    assert margin_uncertainty(torch.tensor([[2.0, -0.5, 1.0]])).tolist() == [-0.5]


def test_ensemble_disagreement_is_the_std_of_the_margins():
    margins = torch.tensor([[[1.0], [2.0], [0.5, ]], [[-1.0], [2.0], [1.5]]])  # [m=2, n=3, P=1]
    assert ensemble_disagreement(margins).tolist() == [1.0, 0.0, 0.5]
    # three models, two pairs: population std of (0, 3, 3) = sqrt(2), of (1, 1, 1) = 0; the larger counts
    three = torch.tensor([[[0.0, 1.0]], [[3.0, 1.0]], [[3.0, 1.0]]])
    assert ensemble_disagreement(three).tolist() == pytest.approx([2.0 ** 0.5])
    with pytest.raises(ValueError, match="at least 2 models"):
        ensemble_disagreement(torch.zeros(1, 3, 1))


def test_item_uncertainty_uses_margin_for_one_model_and_disagreement_for_several():
    assert item_uncertainty(torch.tensor([[0.25, 1.0]])) == pytest.approx(-0.75)
    # both models are confident, in opposite directions: no margin is small, the disagreement is large
    assert item_uncertainty(torch.tensor([[2.0, 0.0], [0.0, 2.0]])) == pytest.approx(2.0)


def test_most_uncertain_first_is_a_stable_descending_order():
    assert most_uncertain_first([-2.0, -0.25, -0.5, -0.25, -3.0]) == [1, 3, 2, 0, 4]
    assert most_uncertain_first([]) == []


def test_select_config_rules(tmp_path):
    base = [f"candidates={tmp_path / 'c.jsonl'}"]
    with pytest.raises(ConfigError, match="select_models: select: uncertainty needs"):
        load_config(LabelConfig, None, [*base, "select=uncertainty"])
    with pytest.raises(ConfigError, match="select_models: only used with select: uncertainty"):
        load_config(LabelConfig, None, [*base, "select_models=[rm]"])
    with pytest.raises(ConfigError, match="mode rating needs select: order or random"):
        load_config(LabelConfig, None, [*base, "mode=rating", "select=uncertainty", "select_models=[rm]"])
    with pytest.raises(ConfigError, match="select"):
        load_config(LabelConfig, None, [*base, "select=best"])
    assert load_config(LabelConfig, None, base).select == "order"


def _candidates(tmp_path, n=6):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"sort\nab{i}", "responses": [f"x{i}", f"y{i}"]}) + "\n"
                            for i in range(n)))
    return path


def test_random_selection_is_a_seeded_shuffle_cut_by_max_items(tmp_path):
    path = _candidates(tmp_path)
    ordered = load_items(load_config(LabelConfig, None, [f"candidates={path}"])).items
    shuffled = [load_items(load_config(LabelConfig, None, [f"candidates={path}", "select=random", f"seed={s}",
                                                           "max_items=4"])).items for s in (3, 3, 4)]
    assert [i.item_id for i in shuffled[0]] == [i.item_id for i in shuffled[1]]
    assert len(shuffled[0]) == 4 and len({i.item_id for i in shuffled[0]}) == 4
    assert {i.item_id for i in shuffled[0]} <= {i.item_id for i in ordered}
    assert [i.item_id for i in shuffled[0]] != [i.item_id for i in shuffled[2]]
    assert [i.item_id for i in shuffled[0]] != [i.item_id for i in ordered[:4]]


def test_uncertainty_selection_names_a_missing_model(tmp_path):
    path = _candidates(tmp_path)
    cfg = load_config(LabelConfig, None, [f"candidates={path}", "select=uncertainty",
                                          f"select_models=[{tmp_path / 'no_rm'}]"])
    with pytest.raises(ConfigError, match=r"select_models\[0\]: .*no_rm is not a reward-model directory"):
        load_items(cfg)


@pytest.fixture(scope="module")
def reward_model_dirs(tmp_path_factory) -> list[str]:
    """Two untrained tiny reward models (different heads): enough to check scoring and ordering in-process."""
    from rlhf_ray.config import ModelConfig
    from rlhf_ray.models.loading import load_reward_model, load_tokenizer

    cfg = ModelConfig(path="tiny:tiny")
    tokenizer = load_tokenizer(cfg)
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = load_reward_model(cfg, torch.float32, tokenizer.pad_token_id)
        path = tmp_path_factory.mktemp(f"rm{seed}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out.append(str(path))
    return out


def test_uncertainty_order_follows_the_reward_models_scores(tmp_path, reward_model_dirs):
    from rlhf_ray.label.select import score_items

    path = _candidates(tmp_path)
    items = load_items(load_config(LabelConfig, None, [f"candidates={path}"])).items
    for dirs in (reward_model_dirs[:1], reward_model_dirs):
        scores = score_items(items, dirs)
        assert [tuple(s.shape) for s in scores] == [(len(dirs), 2)] * len(items)
        expected = most_uncertain_first([item_uncertainty(s) for s in scores])
        assert order_by_uncertainty(items, dirs) == [items[i] for i in expected]
        cfg = load_config(LabelConfig, None, [f"candidates={path}", "select=uncertainty", "max_items=3",
                                              "select_models=[" + ", ".join(dirs) + "]"])
        assert load_items(cfg).items == [items[i] for i in expected[:3]]
