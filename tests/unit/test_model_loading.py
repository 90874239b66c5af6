"""Every model the roles load has dropout off: in train() mode two forwards of the same batch are identical.

The checkpoint is the tiny Qwen2 with `attention_dropout: 0.5` written into its config, so the causal LM and
the sequence-classification head have dropout to remove too (the token-classification head adds its own
`Dropout(0.1)` whatever the config says).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlhf_ray.config import ModelConfig
from rlhf_ray.models.loading import load_causal_lm, load_reward_model, load_value_model


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model_path, path)
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


LOADERS = {
    "causal_lm": lambda cfg: load_causal_lm(cfg, torch.float32),
    "sequence_classification": lambda cfg: load_reward_model(cfg, torch.float32, pad_token_id=0),
    "token_classification": lambda cfg: load_value_model(cfg, torch.float32),
}


def two_forwards(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


@pytest.mark.parametrize("kind", list(LOADERS))
def test_train_mode_outputs_are_deterministic(kind, dropout_model_dir):
    model = LOADERS[kind](ModelConfig(path=dropout_model_dir))
    first, second = two_forwards(model)
    assert torch.equal(first, second)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.attention_dropout == 0.0


@pytest.mark.parametrize("auto_class", ["AutoModelForSequenceClassification", "AutoModelForTokenClassification"])
def test_plain_loading_keeps_dropout(auto_class, dropout_model_dir):
    """What the test above guards against: transformers' own loading leaves dropout on."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(dropout_model_dir, num_labels=1, pad_token_id=0)
    first, second = two_forwards(model)
    assert not torch.equal(first, second)
