"""Log-probabilities of chosen tokens under the sampling distribution, without a [B, L, V] logits tensor.

The policy loss and the KL need `log π(y_t)` only at response positions. The plain way (`log_softmax` of the
model's logits over the whole sequence, in float32) holds `B·L·V` floats several times over: the logits,
their float32 log-softmax, and in the backward pass a gradient of each. At 152k vocabulary, 2048 tokens and
micro-batch 8 that is ~10 GB per copy. Here the final hidden states are projected by the output head a chunk
of positions at a time, each chunk under activation checkpointing (recomputed in the backward pass), so at
most `chunk_rows x V` floats are alive at once, and only the per-position results ([N]) are kept.

Temperature: vLLM samples from `softmax(z / T)` and (with `logprobs_mode="processed_logprobs"`) reports
`log_softmax(z / T)`; the learner and the reference compute the same quantity, or the PPO ratio and the KL
refer to another policy than the one that sampled. Greedy decoding (T = 0) is reported untempered (T = 1),
see `scoring_temperature`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Floats of one chunk's [rows, V] logits: 2**25 x 4 bytes = 128 MiB (about 220 positions at a 152k vocabulary;
# a tiny vocabulary fits every position in one chunk).
DEFAULT_CHUNK_ELEMENTS = 1 << 25


def scoring_temperature(sampling_temperature: float) -> float:
    """The temperature to score tokens sampled at `sampling_temperature` with: itself, or 1 for greedy
    decoding (T = 0), whose logprobs vLLM reports from the untempered logits (`Sampler.sample`, all_greedy)."""
    return float(sampling_temperature) if sampling_temperature > 0 else 1.0


def chunk_rows(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one chunk's logits hold at most `chunk_elements` floats (at least 1)."""
    return max(1, chunk_elements // max(1, vocab_size))


def _scores(states: Tensor, targets: Tensor, head: Optional[Callable[[Tensor], Tensor]], temperature: float,
            with_entropy: bool) -> tuple[Tensor, ...]:
    """(logprob [n], entropy [n]?) of one chunk: `states` [n, H] (or [n, V] logits when head is None)."""
    logits = (states if head is None else head(states)).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return (chosen,)
    # H = -Σ p log p; a banned token (logit -inf) has p = 0 and adds 0, not 0 * -inf = NaN.
    entropy = -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)
    return chosen, entropy


def token_logprobs_chunked(states: Tensor, targets: Tensor, head: Optional[Callable[[Tensor], Tensor]] = None,
                           temperature: float = 1.0, rows: Optional[int] = None,
                           with_entropy: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """`log softmax(head(h) / T)[target]` per position, and optionally the entropy of `softmax(head(h) / T)`,
    computed `rows` positions at a time.

    Equal (values and gradients, to float32 rounding) to the naive
    `log_softmax((states @ W.T).float() / T).gather(targets)`; with gradients enabled each chunk runs under
    non-reentrant activation checkpointing, so the backward pass recomputes one chunk's logits at a time
    instead of keeping all of them. The head is called as a module (not through its weight) so that
    whatever wraps it (tied embeddings, DeepSpeed ZeRO-3 parameter gathering) applies unchanged.

    Args:
        states: [N, H] final hidden states at the positions to score, or [N, V] logits when `head` is None.
        targets: [N] long, the token scored at each position.
        head: [n, H] -> [n, V], e.g. the model's `lm_head`; None when `states` already are logits.
        temperature: T > 0; the logits are divided by it (the sampling distribution).
        rows: positions per chunk; None: `chunk_rows(V)`, V being the head's `out_features` (or the width
            of the logits); a head without `out_features` gets one chunk.
        with_entropy: also return the entropy per position (nats), differentiable.
    Returns:
        (logprobs [N] float32, entropy [N] float32 or None).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to score tokens (greedy decoding scores at 1), got {temperature}")
    n = states.shape[0]
    if rows is None:
        vocab = states.shape[-1] if head is None else getattr(head, "out_features", None)
        rows = chunk_rows(vocab) if vocab else max(n, 1)
    grad = torch.is_grad_enabled()
    parts: list[tuple[Tensor, ...]] = []
    # At least one (possibly empty) chunk: with no position to score the result still reaches the head and
    # the states in the graph, so a backward through it is valid and gives zero gradients.
    for start in range(0, max(n, 1), rows):
        args = (states[start:start + rows], targets[start:start + rows], head, temperature, with_entropy)
        parts.append(checkpoint(_scores, *args, use_reentrant=False) if grad else _scores(*args))
    logprobs = torch.cat([p[0] for p in parts])
    entropy = torch.cat([p[1] for p in parts]) if with_entropy else None
    return logprobs, entropy


def select_positions(x: Tensor, index: Tensor, mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The rows of `x` at `index` where `mask` is set, flattened; and where they go back (`scatter_positions`).

    Args:
        x: [B, L, ...] per-position values (e.g. hidden states).
        index: [B, T] long, a position of `x` per (row, slot).
        mask: [B, T], nonzero on real slots.
    Returns:
        ([N, ...] selected rows, (rows [N], slots [N]) of each in the [B, T] grid).
    """
    b, t = mask.bool().nonzero(as_tuple=True)
    return x[b, index[b, t]], (b, t)


def scatter_positions(values: Tensor, where: tuple[Tensor, Tensor], shape: torch.Size | tuple[int, int]) -> Tensor:
    """[N] values back into a [B, T] grid (0 elsewhere), differentiably."""
    out = torch.zeros(tuple(shape), dtype=values.dtype, device=values.device)
    return out.index_put(where, values)
