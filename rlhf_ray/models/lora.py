"""LoRA adapters (`learner.lora`) through peft, and the trained model's Hugging Face view of them.

`apply_lora` injects peft's LoRA layers into a loaded model *in place* and returns that same model (not a
`PeftModel` wrapper): the learner, DeepSpeed and `models.causal_lm` keep seeing a plain transformers model,
whose `.base_model` is still the backbone. Only the adapters train, plus a scoring model's head (the reward
model's or critic's `score`, kept whole as peft `modules_to_save`: a fresh head has nothing to adapt).

peft renames what it touches: a target layer `X` holds `X.base_layer.weight` (frozen), `X.lora_A.default.weight`
[r, in] and `X.lora_B.default.weight` [out, r]; a saved module `S` holds `S.original_module.*` (frozen) and
`S.modules_to_save.default.*` (trained). Everything that leaves the learner (the saved model, weight sync,
the checksum) uses the base model's names with merged weights, `W' = W + (alpha / r) B A` (Hu et al. 2021,
https://arxiv.org/abs/2106.09685, eq. 3): `hf_name` maps the names, `merge_lora` merges a stream of full
parameters without touching the training module, and `adapter_state` picks the adapter for `model/adapter/`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from rlhf_ray.config.base import LoRAConfig

ADAPTER = "default"  # peft's name for the one adapter
LORA_PARTS = (f".lora_A.{ADAPTER}.", f".lora_B.{ADAPTER}.")
BASE_PART = ".base_layer."
SAVED_PART, ORIGINAL_PART = f".modules_to_save.{ADAPTER}.", ".original_module."
_ATTR = "rlhf_lora"  # the peft LoraConfig kept on the model (a plain attribute: not a module)


def lora_config(model: torch.nn.Module) -> Optional[Any]:
    """The peft `LoraConfig` that `apply_lora` injected into `model` (or a DeepSpeed engine around it); None
    for a model without adapters."""
    inner = getattr(model, "module", model)
    return getattr(inner, _ATTR, None)


def lora_scaling(model: torch.nn.Module) -> float:
    """alpha / r of the model's adapters (plain LoRA: peft's `use_rslora` is never turned on here)."""
    cfg = lora_config(model)
    return float(cfg.lora_alpha) / cfg.r


def target_linear_names(model: torch.nn.Module, targets: str | tuple[str, ...]) -> list[str]:
    """The last name parts of the backbone's linear layers to adapt: all of them for `all-linear`, else
    `targets` (each must match at least one backbone linear layer). The head is never a target: it lies
    outside `model.base_model`, and for a scoring model it trains whole."""
    backbone = model.base_model
    found = sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules()
                    if isinstance(m, torch.nn.Linear) and name})
    if targets == "all-linear":
        if not found:
            raise ValueError(f"learner.lora: {type(model).__name__} has no linear layers in its backbone to adapt")
        return found
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"learner.lora.target_modules: {missing} match no linear layer of {type(model).__name__}'s "
                         f"backbone; its linear layers are named {found}")
    return list(targets)


def trainable_heads(model: torch.nn.Module) -> list[str]:
    """Children outside the backbone that own parameters (a reward model's or critic's `score`), which must
    keep training; empty for a causal LM, whose output head is (tied to) the vocabulary embedding."""
    if model.get_output_embeddings() is not None:
        return []
    prefix = getattr(model, "base_model_prefix", "model")
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig) -> torch.nn.Module:
    """Inject LoRA adapters into `model` in place; returns `model`, with only the adapters (and a scoring
    model's head) requiring gradients. Adapters start with B = 0, so the model's outputs are unchanged."""
    import peft

    heads = trainable_heads(model)
    peft_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                               target_modules=target_linear_names(model, cfg.target_modules),
                               modules_to_save=heads or None)
    wrapper = peft.get_peft_model(model, peft_cfg)
    inner = wrapper.get_base_model()
    assert inner is model  # peft injects in place; the wrapper is dropped here
    setattr(inner, _ATTR, wrapper.peft_config[ADAPTER])
    if getattr(inner, "is_gradient_checkpointing", False):
        # The frozen embedding's output has no grad, so checkpointed blocks would see no input needing one.
        inner.enable_input_require_grads()
    return inner


def hf_name(name: str) -> Optional[str]:
    """The base model's name of a parameter of an adapted model; None for a part the base model lacks
    (`lora_A`/`lora_B`, and the frozen `original_module` copy of a trained head)."""
    if any(part in name for part in LORA_PARTS) or ORIGINAL_PART in name:
        return None
    return name.replace(BASE_PART, ".").replace(SAVED_PART, ".")


def _layer_of(name: str) -> Optional[str]:
    """The adapted layer (`X`) a parameter belongs to, when it is one of `X.base_layer.*` or `X.lora_*`."""
    for part in (BASE_PART, *LORA_PARTS):
        if part in name:
            return name.split(part, 1)[0]
    return None


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`weight + scaling * B @ A` as a new tensor, computed as peft's `merge` does (so bit-equal to it).

    Args:
        weight: [out, in] base weight.
        lora_a: [r, in]; lora_b: [out, r].
        scaling: alpha / r.
    Returns:
        [out, in] in `weight`'s dtype. Half precision on CPU multiplies in float32 (as peft does: CPU bf16/fp16
        matmuls are slow), then casts the update before adding it.
    """
    a, b = lora_a, lora_b
    if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    delta = (b @ a) * scaling
    return weight + delta.to(weight.dtype)


def merge_lora(named: Iterable[tuple[str, torch.Tensor]], scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
    """A stream of an adapted model's full parameters (`named_parameters` order) as the base model's parameters
    with merged weights, in the same order. An adapted layer's parameters are consecutive in that order
    (`base_layer.*`, then `lora_A`, `lora_B`), so one layer is held at a time; other tensors pass through."""
    layer: Optional[str] = None
    parts: dict[str, torch.Tensor] = {}

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        base = {k.removeprefix(BASE_PART): v for k, v in parts.items() if k.startswith(BASE_PART)}
        a, b = parts.get(f"{LORA_PARTS[0]}weight"), parts.get(f"{LORA_PARTS[1]}weight")
        if "weight" not in base or (a is None) != (b is None):
            raise ValueError(f"adapted layer {layer!r}: got {sorted(parts)}, expected base_layer.weight with both "
                             "or neither of lora_A and lora_B")
        for key, tensor in base.items():
            merge = key == "weight" and a is not None
            yield f"{layer}.{key}", merged_weight(tensor, a, b, scaling) if merge else tensor

    for name, tensor in named:
        owner = _layer_of(name)
        if layer is not None and owner != layer:
            yield from flush()
            layer, parts = None, {}
        if owner is not None:
            layer = owner
            parts[name[len(owner):]] = tensor
            continue
        renamed = hf_name(name)
        if renamed is not None:
            yield renamed, tensor
    if layer is not None:
        yield from flush()


def adapter_state(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names peft's `PeftModel.from_pretrained` reads: `base_model.model.` +
    the parameter name without the adapter name (`X.lora_A.weight`, and a trained head as `S.weight`)."""
    state = {}
    for name, tensor in named:
        if any(part in name for part in LORA_PARTS):
            key = name.replace(f".{ADAPTER}.", ".")
        elif SAVED_PART in name:
            key = name.replace(SAVED_PART, ".")
        else:
            continue
        state[f"base_model.model.{key}"] = tensor.detach().to("cpu", copy=True).contiguous()
    return state


def save_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `adapter_state(...)` as a peft adapter directory (adapter_config.json + adapter_model.safetensors),
    loadable with `PeftModel.from_pretrained(base_model, path)`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lora_config(model).save_pretrained(str(path))
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
