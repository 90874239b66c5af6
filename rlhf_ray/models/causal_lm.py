"""Response-token log-probabilities of a causal LM, from its final hidden states and output head.

`response_logprobs` is what the learner (policy loss, pi_old) and the reference scorer call: the backbone's
last hidden state is taken at the response positions only, and `algorithms.logprobs.token_logprobs_chunked`
projects it through the head a chunk at a time, so the [B, L, V] logits tensor never exists.

That is exact only when the model's logits are `lm_head(last_hidden_state)`. Families that scale or
soft-cap the logits after the head (Gemma 2/3 `final_logit_softcapping`, Cohere `logit_scale`, Granite
`logits_scaling`, ...) are recognised by their config keys and take the fallback: the model's own logits,
with the float32 log-softmax still done chunk-wise at response positions only. A head the code cannot find
(no `get_output_embeddings()` returning a Linear) takes the same fallback.

Tied embeddings need nothing special: the head module's weight *is* the embedding, and calling the module
(never reading its weight) accumulates the gradient into the one shared parameter. Under DeepSpeed ZeRO-3
the head's weight is partitioned and every call gathers it, a collective that every rank must make equally
often; chunk counts differ between ranks, so there the head is applied once to all response positions
(still only those) and the log-softmax is chunked.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from rlhf_ray.algorithms.logprobs import (
    DEFAULT_CHUNK_ELEMENTS,
    chunk_rows,
    scatter_positions,
    select_positions,
    token_logprobs_chunked,
)

# Config keys of models whose logits are not plain lm_head(h) (set and not None => fallback path).
SCALED_LOGITS_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                      "lm_head_multiplier")


def _unwrap(model: Any) -> Any:
    """The Hugging Face model inside a DeepSpeed engine (which keeps it as `.module`)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _scales_logits(config: Any) -> bool:
    configs = [config, getattr(config, "text_config", None)]
    return any(getattr(c, key, None) is not None for c in configs if c is not None for key in SCALED_LOGITS_KEYS)


def output_head(model: Any) -> Optional[torch.nn.Linear]:
    """The output head when the model's logits are exactly `head(backbone(...).last_hidden_state)`, else None."""
    inner = _unwrap(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    backbone = getattr(inner, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or backbone is None or backbone is inner:
        return None
    if _scales_logits(getattr(inner, "config", None)) or getattr(inner.config, "tie_last_hidden_states", True) is False:
        return None
    return head


def _is_partitioned(head: torch.nn.Module) -> bool:
    """DeepSpeed ZeRO-3 manages the weight (it carries a `ds_id`): each call of the head is a collective."""
    return hasattr(head.weight, "ds_id")


def final_hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, L, H] last hidden state (after the final norm), without projecting every position to the vocabulary.

    With gradients the call goes through `model` itself (a DeepSpeed engine registers its backward hooks on
    the outputs of its forward) asking for one position of logits; without, the backbone alone is run, which
    does not keep every layer's hidden states around.
    """
    if torch.is_grad_enabled():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    logits_to_keep=1)
        return out.hidden_states[-1]  # transformers ties it to last_hidden_state (capture_outputs)
    backbone = _unwrap(model).base_model
    return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def response_logprobs(model: Any, input_ids: Tensor, attention_mask: Tensor, index: Tensor, mask: Tensor,
                      temperature: float = 1.0, with_entropy: bool = False,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[Tensor, Optional[Tensor]]:
    """log p_T(token) of every response token, `p_T = softmax(logits / T)`, and optionally its entropy.

    Args:
        model: a causal LM (or a DeepSpeed engine around one).
        input_ids, attention_mask: [B, L] prompt + response, right-padded.
        index: [B, T] long; `index[b, t]` is the position whose logits predict response token t (so the
            token itself is `input_ids[b, index[b, t] + 1]`).
        mask: [B, T] nonzero on real response tokens.
        temperature: T > 0.
        with_entropy: also return the entropy of p_T at each response position.
        chunk_elements: logits floats per chunk (`algorithms.logprobs.chunk_rows`).
    Returns:
        (logprobs [B, T] float32, entropy [B, T] float32 or None); 0 on padding.
    """
    head = output_head(model)
    if head is None:
        states = model(input_ids=input_ids, attention_mask=attention_mask).logits
    else:
        states = final_hidden_states(model, input_ids, attention_mask)
    selected, where = select_positions(states, index, mask)
    targets = input_ids[where[0], index[where] + 1]
    if head is not None and _is_partitioned(head):
        selected, head = head(selected), None
    rows = chunk_rows(selected.shape[-1] if head is None else head.out_features, chunk_elements)
    logprobs, entropy = token_logprobs_chunked(selected, targets, head, temperature, rows, with_entropy)
    shape = mask.shape
    return (scatter_positions(logprobs, where, shape),
            None if entropy is None else scatter_positions(entropy, where, shape))
