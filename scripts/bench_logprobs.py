"""Peak memory of one learner policy-loss step (logprobs + backward): full-vocabulary logits against the chunked
response-position path that `PolicyObjective` uses.

A Qwen2 with a 152k vocabulary and a small hidden size (so the vocabulary projection dominates, as it does for
memory in real models), one 2048-token sequence (a 128-token prompt, a 1920-token response), fp32 on CPU.
Each variant runs in a fresh subprocess; its figure is the peak resident memory during the step minus the
resident memory just before it (`ru_maxrss` against `/proc/self/status` VmRSS), so the model and the batch
are not counted.

    naive          what the learner did before: log_softmax over [B, L, V] in fp32, then the entropy over
                   [B, L, V] (always, detached when entropy_coef is 0)
    naive-noent    the same without the entropy
    chunked        PolicyObjective.loss: response positions only, chunks of the head's output under
                   checkpointing, entropy from the same chunks (logged, no gradient)
    chunked-ent    the same with entropy_coef > 0 (entropy differentiated)

    .venv/bin/python scripts/bench_logprobs.py [--vocab 152064] [--tokens 2048] [--hidden 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "naive-noent", "chunked", "chunked-ent")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def build(args: argparse.Namespace):
    import pyarrow as pa
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf_ray.roles.objectives import PolicyObjective

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=2 * args.hidden, tie_word_embeddings=args.tied)
    model = Qwen2ForCausalLM(config).float().train()
    prompt_len = 128
    response_len = args.tokens - prompt_len
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=gen).tolist()
    floats = pa.list_(pa.float32())
    table = pa.table({
        "prompt_ids": pa.array([ids[:prompt_len]], pa.list_(pa.int32())),
        "response_ids": pa.array([ids[prompt_len:]], pa.list_(pa.int32())),
        "old_logprobs": pa.array([[-12.0] * response_len], floats),
        "advantages": pa.array([torch.randn(response_len, generator=gen).tolist()], floats),
        "ref_logprobs": pa.array([[-12.0] * response_len], floats)})
    return model, PolicyObjective().micro_batch(table, [0], pad_id=0)


def naive_loss(model, batch, with_entropy: bool):
    """The learner's loss before chunking (objectives.py at commit 0686d15), entropy coefficient 0."""
    from rlhf_ray.algorithms.losses import next_token_logprobs
    from rlhf_ray.algorithms.policy_loss import aggregate, entropy_from_logits, ppo_policy_loss

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logprobs = next_token_logprobs(logits, batch.input_ids).gather(1, batch.response_index)
    out = ppo_policy_loss(logprobs, batch.old_logprobs, batch.advantages, batch.mask, 0.2)
    if with_entropy:
        entropy = entropy_from_logits(logits[:, :-1].detach())
        aggregate(entropy.gather(1, batch.response_index), batch.mask, "token")
    return out.loss_sum


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from rlhf_ray.roles.objectives import PolicyObjective

    torch.set_num_threads(args.threads)
    model, batch = build(args)
    before = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    began = time.perf_counter()
    if args.variant.startswith("naive"):
        loss = naive_loss(model, batch, with_entropy=args.variant == "naive")
    else:
        objective = PolicyObjective(entropy_coef=0.01 if args.variant == "chunked-ent" else 0.0)
        loss = objective.loss(model, batch).loss_sum
    loss.backward()
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    head_grad = model.lm_head.weight.grad
    return {"variant": args.variant, "peak_delta_mb": (peak - before) / 2**20, "seconds": seconds,
            "setup_peak_above_step": peak_before >= peak, "loss": float(loss),
            "head_grad_norm": float(head_grad.norm())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tied", action="store_true", help="tie the head to the input embedding")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant here (what the parent calls)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--vocab", str(args.vocab), "--tokens",
               str(args.tokens), "--hidden", str(args.hidden), "--threads", str(args.threads)]
        cmd += ["--tied"] if args.tied else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    naive = rows[0]["peak_delta_mb"]
    print(f"vocab {args.vocab}, {args.tokens} tokens (1 sequence, {args.tokens - 128}-token response), hidden "
          f"{args.hidden}, fp32, {'tied' if args.tied else 'untied'} head, {args.threads} threads")
    print(f"{'variant':12} {'peak MB':>9} {'vs naive':>9} {'seconds':>8} {'loss':>12} {'|grad lm_head|':>15}")
    for r in rows:
        print(f"{r['variant']:12} {r['peak_delta_mb']:9.0f} {r['peak_delta_mb'] / naive:9.3f} {r['seconds']:8.2f} "
              f"{r['loss']:12.6f} {r['head_grad_norm']:15.6f}" + ("  (setup peak higher)" if r["setup_peak_above_step"]
                                                                   else ""))


if __name__ == "__main__":
    main()
