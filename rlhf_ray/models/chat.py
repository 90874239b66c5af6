"""Where an assistant turn ends: the token ids at which generation stops, read off the chat template.

Stopping at the tokenizer's EOS alone is right only for templates whose turns end with it (the tiny qwen2
family). ChatML models end a turn with `<|im_end|>` and Llama 3 with `<|eot_id|>`, and neither is the EOS of
many such tokenizers, nor always named by the model's generation config; a generator that stops only at the
EOS then runs every response to max_new_tokens. The template is the one place that says what ends a turn,
so we ask it: render a conversation whose assistant message is a sentinel and take the first special token
the template writes after it. No per-model table to keep up to date.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from rlhf_ray.data.errors import ChatTemplateError

# Letters only: no template trims, escapes or splits it, and it cannot contain a special token.
SENTINEL = "RLHFRAYENDOFTURNPROBE"


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token: the named ones (bos, eos, pad, ...) and added tokens marked special.

    `all_special_ids` alone misses tokens such as `<|im_end|>` that a tokenizer adds as special without
    naming them; `added_tokens_decoder` lists them.
    """
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def end_of_turn_ids(tokenizer: Any) -> tuple[int, ...]:
    """(end-of-turn id, eos id) of `tokenizer`, without repeats: the ids a response may stop at.

    The end of turn is the first special token that the chat template writes after an assistant message's
    content (`<|im_end|>`, `<|eot_id|>`, or the EOS itself); a template that writes none after it leaves
    only the EOS. Raises `ChatTemplateError` when the tokenizer has no chat template, the template fails on
    a plain user + assistant conversation or drops the assistant's content, or neither id exists.
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(name, "the tokenizer has no chat template, so where an assistant turn ends (the "
                                "stop token) is unknown; use a chat or instruct model's tokenizer "
                                "(model.tokenizer) or give the tokenizer a chat_template")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as err:
        raise ChatTemplateError(name, "the chat template fails on a plain user + assistant conversation, so the "
                                "end of an assistant turn cannot be found", detail=str(err)) from err
    at = text.rfind(SENTINEL)
    if at < 0:
        raise ChatTemplateError(name, "the chat template does not write the assistant message's content, so the "
                                "end of an assistant turn cannot be found", detail=f"rendered {text!r:.200}")
    after = tokenizer(text[at + len(SENTINEL):], add_special_tokens=False)["input_ids"]
    special = special_token_ids(tokenizer)
    end_of_turn = next((int(i) for i in after if i in special), None)
    ids = [i for i in (end_of_turn, tokenizer.eos_token_id) if i is not None]
    if not ids:
        raise ChatTemplateError(name, "no token marks the end of a response: the chat template writes no special "
                                "token after an assistant message and the tokenizer has no eos_token",
                                detail=f"after the assistant content it writes {text[at + len(SENTINEL):]!r:.80}")
    return tuple(dict.fromkeys(ids))
