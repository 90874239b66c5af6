"""Tiny offline models for tests and the demo: nothing is downloaded.

`tiny:<preset>` as a model path builds (once, into the cache) a tokenizer trained here with the
`tokenizers` library and a random-init Qwen2 causal LM, saved in Hugging Face format (safetensors +
tokenizer files). From then on it is an ordinary model directory: `AutoModelForCausalLM.from_pretrained`
and vLLM load it like any checkpoint, so the loading code under test is the real one.

The tokenizer is byte-level BPE whose pre-tokenizer isolates every non-space character, so merges never
join two letters: each letter is one token. Character tasks (reverse, sort) need that to be learnable by a
0.5M-param model in minutes (STACK.md measured a character vocabulary); a real model's tokenizer is of
course used as it is.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# name -> Qwen2 shape. Parameter counts include the (tied) embedding of the ~270-token vocabulary.
PRESETS: dict[str, dict[str, int]] = {
    # 0.53M params: tests; learns `reverse` in about a minute of SFT on 2 cores.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512),
    # 3.2M params.
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024),
    # 11M params: the upper end of what still trains at a useful speed here.
    "base": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=1536),
}
TINY_PREFIX = "tiny:"
_FORMAT_VERSION = "2"  # bump when the recipe changes, so caches rebuild


def cache_dir() -> Path:
    """Where built assets live: `$RLHF_RAY_CACHE`, else `~/.cache/rlhf_ray`."""
    return Path(os.environ.get("RLHF_RAY_CACHE") or Path.home() / ".cache" / "rlhf_ray")


def build_tokenizer():
    """A byte-level BPE tokenizer with the chat template, as a transformers `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf_ray.data.synthetic import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+|[^\s]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    # unk_token is never produced by byte-level BPE, but must be named: transformers loads every qwen2
    # directory as Qwen2Tokenizer, which otherwise adds "<|endoftext|>" as unk at id 267, one past the
    # model's embedding (text containing it would index out of range).
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>", unk_token="<|end|>",
        chat_template=CHAT_TEMPLATE, padding_side="right", model_max_length=4096,
    )


def build_model_dir(preset: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write tokenizer + random-init Qwen2 (`preset` shape, `seed` init) to `out_dir` in HF format."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0, torch_dtype="float32",
        **PRESETS[preset],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def ensure_tiny_model(preset: str, seed: int = 0) -> Path:
    """The cached directory of `preset`, building it on first use (safe when processes race)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
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
