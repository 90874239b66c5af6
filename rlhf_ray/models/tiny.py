"""Tiny offline models for tests and the demo: nothing is downloaded.

`tiny:<preset>` as a model path builds (once, into the cache) a tokenizer trained here with the
`tokenizers` library and a random-init causal LM, saved in Hugging Face format (safetensors + tokenizer
files). From then on it is an ordinary model directory: `AutoModelForCausalLM.from_pretrained` and vLLM load
it like any checkpoint, so the loading code under test is the real one.

Three families, so the code is not tested on one shape of model only (each difference below is one that
real chat models have and that code gets wrong when it assumes the first family):
- `qwen2` (`tiny`, `small`, `base`): Qwen2, `<|user|>...<|end|>` template, end of turn == EOS, separate pad,
  tied embeddings;
- `llama` (`llama`): Llama, Llama-3 template (`<|start_header_id|>role<|end_header_id|>\\n\\n content
  <|eot_id|>`, BOS written by the template), end of turn `<|eot_id|>` is not the EOS (`<|end_of_text|>`),
  no pad token, and a generation config that names only the EOS (so only code that derives the end of turn
  from the template stops there);
- `chatml` (`chatml`, `chatml-100m`): Qwen2, ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`), end of turn
  `<|im_end|>` is not the EOS, pad == EOS == `<|endoftext|>`, a newline after the end of turn, untied
  embeddings.

The tokenizer is byte-level BPE whose pre-tokenizer isolates every non-space character, so merges never
join two letters: each letter is one token. Character tasks (reverse, sort) need that to be learnable by a
0.5M-param model in minutes (STACK.md measured a character vocabulary); a real model's tokenizer is of
course used as it is.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Llama 3's layout (content trimmed as Llama 3 does); BOS comes from the template, not the tokenizer.
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
LLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"]

CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class Family:
    """Architecture, tokens and template of one tiny model family."""

    architecture: str                 # "qwen2" | "llama"
    special_tokens: tuple[str, ...]
    chat_template: str
    eos: str
    bos: str | None = None
    pad: str | None = None            # None: no pad token (loading uses eos)
    unk: str | None = None
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0


FAMILIES: dict[str, Family] = {
    # unk_token is never produced by byte-level BPE, but must be named for qwen2 directories: transformers
    # loads every one as Qwen2Tokenizer, which otherwise adds "<|endoftext|>" as unk one past the model's
    # embedding (text containing it would index out of range).
    "qwen2": Family("qwen2", tuple(SPECIAL_TOKENS), CHAT_TEMPLATE, eos="<|end|>", bos="<|bos|>", pad="<|pad|>",
                    unk="<|end|>"),
    # RoPE base 10000, not Llama 3's 500000: at head_dim 32 and 50-token sequences that base leaves positions
    # nearly indistinguishable, and the position-bound character tasks barely learnable (400 SFT steps: 0.19
    # exact match against ChatML's 0.47). The family is about the chat shape, not the RoPE base.
    "llama": Family("llama", tuple(LLAMA_SPECIAL_TOKENS), LLAMA_CHAT_TEMPLATE, eos="<|end_of_text|>",
                    bos="<|begin_of_text|>"),
    "chatml": Family("qwen2", tuple(CHATML_SPECIAL_TOKENS), CHATML_CHAT_TEMPLATE, eos="<|endoftext|>",
                     pad="<|endoftext|>", unk="<|endoftext|>", tie_word_embeddings=False),
}

_TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512)
# name -> model shape. Parameter counts include the embedding of the ~270-token vocabulary.
PRESETS: dict[str, dict[str, int]] = {
    # 0.53M params: tests; learns `reverse` in about a minute of SFT on 2 cores.
    "tiny": dict(_TINY),
    # 3.2M params.
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024),
    # 11M params: the upper end of what still trains at a useful speed here.
    "base": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=1536),
    # 0.53M params (tied embeddings, as Llama 3.2 1B/3B).
    "llama": dict(_TINY),
    # 0.57M params (untied embeddings).
    "chatml": dict(_TINY),
    # 102M params: the GPU check's model; built only when named (about 400 MB in fp32).
    "chatml-100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                        intermediate_size=3072, max_position_embeddings=2048),
}
PRESET_FAMILY: dict[str, str] = {"llama": "llama", "chatml": "chatml", "chatml-100m": "chatml"}  # else qwen2
TINY_PREFIX = "tiny:"
_FORMAT_VERSION = "3"  # bump when the recipe changes, so caches rebuild


def cache_dir() -> Path:
    """Where built assets live: `$RLHF_RAY_CACHE`, else `~/.cache/rlhf_ray`."""
    return Path(os.environ.get("RLHF_RAY_CACHE") or Path.home() / ".cache" / "rlhf_ray")


def family_of(preset: str) -> Family:
    """The family of a preset name (see PRESETS)."""
    _check_preset(preset)
    return FAMILIES[PRESET_FAMILY.get(preset, "qwen2")]


def build_tokenizer(family: str = "qwen2"):
    """A byte-level BPE tokenizer with the family's chat template, as a transformers `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf_ray.data.synthetic import corpus

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; valid families: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+|[^\s]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(spec.special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, **{k: v for k, v in named.items() if v is not None},
        chat_template=spec.chat_template, padding_side="right", model_max_length=4096,
    )


def build_model_dir(preset: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write tokenizer + random-init causal LM (`preset` shape and family, `seed` init) to `out_dir` in HF format."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    spec = family_of(preset)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "llama": (LlamaConfig, LlamaForCausalLM)}[spec.architecture]
    tokenizer = build_tokenizer(PRESET_FAMILY.get(preset, "qwen2"))
    config = config_cls(
        vocab_size=len(tokenizer), tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=spec.rope_theta, torch_dtype="float32",
        **{"max_position_embeddings": 512, **PRESETS[preset]},
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    # Only the EOS, as many base and some chat models ship: stopping at the end of turn is the caller's job.
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; valid presets: {', '.join(PRESETS)}")


def ensure_tiny_model(preset: str, seed: int = 0) -> Path:
    """The cached directory of `preset`, building it on first use (safe when processes race)."""
    _check_preset(preset)
    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{preset}-seed{seed}-v{_FORMAT_VERSION}"
    if (final / "config.json").exists():
        return final
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "config.json").exists():
            tmp = root / f".{final.name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build_model_dir(preset, tmp, seed=seed)
            # A directory without config.json is no model (e.g. something wrote tokenizer files there before it
            # existed); os.replace cannot replace a non-empty directory, so clear it under the lock.
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    return final


def resolve_model_path(path: str) -> str:
    """`tiny:<preset>` (optionally `tiny:<preset>@<seed>`) -> the built directory; anything else as given."""
    if not path.startswith(TINY_PREFIX):
        return path
    spec = path[len(TINY_PREFIX):]
    preset, _, seed = spec.partition("@")
    if preset not in PRESETS or (seed and not seed.isdigit()):
        raise ValueError(f"model path {path!r}: expected tiny:<preset> or tiny:<preset>@<seed> with preset "
                         f"one of {', '.join(PRESETS)} and a non-negative integer seed")
    return str(ensure_tiny_model(preset, int(seed) if seed else 0))
