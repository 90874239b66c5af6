"""LoRA (`learner.lora`, `models.lora`) without Ray: config errors, what trains, names, merged weights, saving."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import ModelConfig, SFTConfig
from rlhf_ray.config.base import LoRAConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.distributed.deepspeed_setup import (
    iter_full_parameters,
    lora_adapter,
    parameter_metas,
)
from rlhf_ray.distributed.weight_sync import TensorMeta
from rlhf_ray.models.loading import load_causal_lm, load_reward_model, load_value_model
from rlhf_ray.models.lora import (
    apply_lora,
    hf_name,
    merge_lora,
    merged_weight,
    save_adapter,
)


def _trained(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every trainable tensor (fresh adapters have B = 0, which would merge to no change)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.fixture()
def lora_lm(tiny_model_path):
    return apply_lora(load_causal_lm(ModelConfig(path=tiny_model_path), torch.float32), LoRAConfig(rank=4, alpha=8))


# -- config ---------------------------------------------------------------------------------------------------
def test_lora_config_from_overrides_and_defaults():
    base = ["data.train=x.jsonl"]
    assert load_config(SFTConfig, None, base).learner.lora is None  # full fine-tuning unless asked
    cfg = load_config(SFTConfig, None, base + ["learner.lora.rank=4", "learner.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.learner.lora == LoRAConfig(rank=4, alpha=16.0, dropout=0.0, target_modules=("q_proj", "v_proj"))
    assert load_config(SFTConfig, None, base + ["learner.lora={}"]).learner.lora.target_modules == "all-linear"


@pytest.mark.parametrize("override", ["learner.lora.rank=0", "learner.lora.alpha=0", "learner.lora.dropout=1",
                                      "learner.lora.target_modules=q_proj", "learner.lora.target_modules=[]",
                                      "learner.lora.rnk=4"])
def test_lora_config_rejects_bad_values_naming_the_key(override):
    field = override.split("=")[0].replace(".", r"\.")  # the section's own error, not "expected a mapping"
    with pytest.raises(ConfigError, match=field):
        load_config(SFTConfig, None, ["data.train=x.jsonl", override])


def test_lora_config_messages_say_what_is_valid():
    with pytest.raises(ConfigError, match="all-linear or a list of module names"):
        LoRAConfig(target_modules="q_proj")
    with pytest.raises(ConfigError, match="non-empty list"):
        LoRAConfig(target_modules=())


def test_unknown_target_module_lists_the_real_ones(tiny_model_path):
    model = load_causal_lm(ModelConfig(path=tiny_model_path), torch.float32)
    with pytest.raises(ValueError, match=r"\['qq'\] match no linear layer.*q_proj"):
        apply_lora(model, LoRAConfig(target_modules=("qq",)))


# -- what trains ----------------------------------------------------------------------------------------------
def test_only_adapters_train_on_a_causal_lm(lora_lm):
    trainable = [n for n, p in lora_lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear
    assert sum(p.numel() for n, p in lora_lm.named_parameters() if p.requires_grad) < 0.2 * sum(
        p.numel() for p in lora_lm.parameters())


def test_target_list_adapts_only_those(tiny_model_path):
    model = apply_lora(load_causal_lm(ModelConfig(path=tiny_model_path), torch.float32),
                       LoRAConfig(target_modules=("q_proj", "v_proj")))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}


@pytest.mark.parametrize("loader", ["reward", "value"])
def test_scoring_models_keep_their_head_trainable(tiny_model_path, tiny_tokenizer, loader):
    cfg = ModelConfig(path=tiny_model_path)

    def load():
        return (load_reward_model(cfg, torch.float32, tiny_tokenizer.pad_token_id) if loader == "reward"
                else load_value_model(cfg, torch.float32))

    model = apply_lora(load(), LoRAConfig(rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.modules_to_save.default.weight" in trainable
    assert not any("score" in n and "lora_" in n for n in trainable)  # the head trains whole, not adapted
    assert [m.name for m in parameter_metas(model)] == [n for n, _ in load().named_parameters()]


def test_fresh_adapters_leave_outputs_unchanged(tiny_model_path, lora_lm):
    plain = load_causal_lm(ModelConfig(path=tiny_model_path), torch.float32)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    assert torch.equal(plain(input_ids=ids).logits, lora_lm(input_ids=ids).logits)


def test_gradients_reach_only_the_adapters(lora_lm):
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    lora_lm(input_ids=ids).logits.sum().backward()
    with_grad = {n for n, p in lora_lm.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in lora_lm.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_still_reaches_the_adapters(tiny_model_path):
    model = load_causal_lm(ModelConfig(path=tiny_model_path, gradient_checkpointing=True), torch.float32)
    model = _trained(apply_lora(model, LoRAConfig(rank=2))).train()  # random B, so A gets gradients too
    model(input_ids=torch.tensor([[3, 4, 5, 6, 7]])).logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), [
        n for n, g in grads.items() if g is None or not g.abs().sum() > 0]


# -- names and merged weights ---------------------------------------------------------------------------------
def test_hf_name_mapping():
    assert hf_name("model.layers.0.self_attn.q_proj.base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_name("model.layers.0.self_attn.q_proj.base_layer.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert hf_name("model.layers.0.mlp.up_proj.lora_B.default.weight") is None
    assert hf_name("score.original_module.weight") is None
    assert hf_name("score.modules_to_save.default.weight") == "score.weight"
    assert hf_name("model.embed_tokens.weight") == "model.embed_tokens.weight"


def test_merged_weight_on_hand_values():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])   # [out 3, in 2]
    a = torch.tensor([[1.0, 2.0]])                                 # [r 1, in 2]
    b = torch.tensor([[1.0], [0.0], [-1.0]])                       # [out 3, r 1]
    got = merged_weight(weight, a, b, scaling=0.5)
    assert torch.equal(got, torch.tensor([[1.5, 1.0], [0.0, 1.0], [1.5, 1.0]]))
    assert torch.equal(weight, torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))  # not modified


def test_merged_stream_equals_peft_merge_and_unload(tiny_model_path, lora_lm):
    import peft  # noqa: F401  (merge_and_unload below is peft's own merge)

    model = _trained(lora_lm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = list(iter_full_parameters(model, zero_stage=0, rank=0))
    assert [n for n, _ in merged] == [n for n, _ in load_causal_lm(ModelConfig(path=tiny_model_path),
                                                                    torch.float32).named_parameters()]
    assert [TensorMeta.of(n, t) for n, t in merged] == parameter_metas(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the module is untouched
    reference = _peft_merged(model)
    for name, tensor in merged:
        assert torch.equal(tensor, reference[name]), name
    # The merged weights compute what the adapted model computes.
    plain = load_causal_lm(ModelConfig(path=tiny_model_path), torch.float32)
    plain.load_state_dict(dict(merged), strict=False)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["llama", "chatml"])
def test_other_chat_families_adapt_and_merge(preset):
    """The Llama and ChatML shapes (Llama: no biases, its own projection names; ChatML: Qwen2 with another
    template): all-linear adapts every attention and MLP projection, never the head, and the merged stream is
    peft's merge and computes what the adapted model computes."""
    from rlhf_ray.models.tiny import ensure_tiny_model

    path = str(ensure_tiny_model(preset))
    model = _trained(apply_lora(load_causal_lm(ModelConfig(path=path), torch.float32), LoRAConfig(rank=4, alpha=8)))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, adapted
    merged = dict(iter_full_parameters(model, zero_stage=0, rank=0))
    reference = _peft_merged(model)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[n], reference[n]) for n in merged)
    plain = load_causal_lm(ModelConfig(path=path), torch.float32)
    plain.load_state_dict(merged, strict=False)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _peft_merged(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's own merge of a copy of `model` (merge_and_unload on the in-place-adapted model)."""
    import copy

    from peft.tuners.lora import LoraLayer

    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return {hf_name(n): p.detach() for n, p in clone.named_parameters() if hf_name(n) is not None}


def test_merge_stream_rejects_a_layer_missing_its_base():
    with pytest.raises(ValueError, match="expected base_layer.weight"):
        list(merge_lora([("x.lora_A.default.weight", torch.zeros(1, 2)),
                         ("x.lora_B.default.weight", torch.zeros(2, 1))], 1.0))


def test_only_rank0_yields_merged_weights(lora_lm):
    assert list(iter_full_parameters(lora_lm, zero_stage=2, rank=1)) == []
    assert lora_adapter(lora_lm, zero_stage=2, rank=1) is None
    raw = [n for n, _ in iter_full_parameters(lora_lm, zero_stage=0, rank=0, merged=False)]
    assert raw == [n for n, _ in lora_lm.named_parameters()]


# -- saving ---------------------------------------------------------------------------------------------------
def test_saved_merged_model_and_adapter_load_back(tmp_path, tiny_model_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = ModelConfig(path=tiny_model_path)
    model = _trained(apply_lora(load_reward_model(cfg, torch.float32, tiny_tokenizer.pad_token_id),
                                LoRAConfig(rank=2)))
    state = dict(iter_full_parameters(model, zero_stage=0, rank=0))
    model.save_pretrained(tmp_path / "model", state_dict=state)  # what Learner.save_model writes
    save_adapter(model, lora_adapter(model, zero_stage=0, rank=0), tmp_path / "model" / "adapter")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    expected = model(input_ids=ids).logits

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    for name, tensor in merged.named_parameters():
        assert torch.equal(tensor, state[name]), name
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)

    base = load_reward_model(cfg, torch.float32, tiny_tokenizer.pad_token_id)
    adapted = PeftModel.from_pretrained(base, tmp_path / "model" / "adapter")
    torch.testing.assert_close(adapted(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
