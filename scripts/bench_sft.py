"""SFT training throughput: rlhf_ray's learner group against a single-process plain torch loop.

    python scripts/bench_sft.py [--preset tiny] [--steps 60] [--global-batch 64]

Same model, data, global batch, optimizer (AdamW, fp32) and sequence packing (right padding) on both sides;
tokens/s counts the non-padding tokens of every step, measured after a few warm-up steps. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_ray.algorithms.losses import sft_loss  # noqa: E402
from rlhf_ray.config import SFTConfig  # noqa: E402
from rlhf_ray.config_loader import load_config  # noqa: E402
from rlhf_ray.data.collate import collate_sft  # noqa: E402
from rlhf_ray.data.sft import load_sft_data  # noqa: E402
from rlhf_ray.data.synthetic import write_sft_dataset  # noqa: E402
from rlhf_ray.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from rlhf_ray.stages.common import StepSampler, read_metrics  # noqa: E402
from rlhf_ray.stages.sft import run_sft  # noqa: E402

WARMUP = 5


def plain_torch(cfg: SFTConfig, steps: int, threads: int) -> float:
    """Tokens/s of a textbook single-process loop: forward, token-mean loss, backward, AdamW step."""
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(cfg.model)
    data = load_sft_data(cfg.data, tokenizer, cfg.run.seed)
    model = load_causal_lm(cfg.model, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, betas=(0.9, 0.95))
    sampler = StepSampler(data.train.num_rows, cfg.learner.global_batch_size, 1, cfg.run.seed)
    rates = []
    for step in range(steps + WARMUP):
        began = time.perf_counter()
        batch = collate_sft(data.train, sampler.shards(step)[0], tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss_sum, count = sft_loss(logits, batch.input_ids, batch.loss_mask)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP:
            rates.append(int(batch.attention_mask.sum()) / (time.perf_counter() - began))
    return statistics.median(rates)


def learner_group(cfg: SFTConfig) -> float:
    result = run_sft(cfg)
    rates = [m["tokens_per_s"] for m in read_metrics(result.run_dir) if m["split"] == "train"]
    return statistics.median(rates[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tiny model preset (tiny, small, base)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RLHF_RAY_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))
    threads = os.cpu_count() or 1
    if args.plain_only:
        data = Path(args.data)
        cfg = load_config(SFTConfig, None, [f"model.path=tiny:{args.preset}", f"data.train={data}",
                                            f"data.eval={data.with_name('sft_eval.jsonl')}", "data.max_length=64",
                                            "learner.lr=1e-3", f"learner.micro_batch_size={args.global_batch}"])
        print(plain_torch(cfg, args.steps, threads))
        return
    work = Path(tempfile.mkdtemp(prefix="rlhf_ray_bench_"))
    files = write_sft_dataset(work / "data", n_train=4000, n_eval=16)

    def config(name: str, *extra: str) -> SFTConfig:
        return load_config(SFTConfig, None, [
            f"model.path=tiny:{args.preset}", f"data.train={files['train']}", f"data.eval={files['eval']}",
            "data.max_length=64", f"run.output_dir={work}/runs", f"run.name={name}", "run.resume=never",
            f"run.max_steps={args.steps + WARMUP}", "learner.lr=1e-3", "learner.lr_schedule=constant",
            "eval.num_generate=0", "eval.at_start=false", *extra])

    def plain_in_fresh_process() -> float:
        # In a fresh process of its own, as each learner rank is.
        out = subprocess.run([sys.executable, __file__, "--plain-only", "--preset", args.preset, "--steps",
                              str(args.steps), "--global-batch", str(args.global_batch), "--data", str(files["train"])],
                             check=True, capture_output=True, text=True).stdout
        return float(out.strip().splitlines()[-1])

    rows = []
    plain = plain_in_fresh_process()
    rows.append((f"plain torch, 1 process, {threads} threads", plain))
    two = learner_group(config("zero2", "learner.num_ranks=2", "learner.zero_stage=2",
                               f"learner.micro_batch_size={args.global_batch // 2}", f"run.num_cpus={threads}"))
    rows.append(("rlhf_ray, 2 ranks, ZeRO-2 (gloo)", two))
    one = learner_group(config("zero0", "learner.num_ranks=1", "learner.zero_stage=0",
                               f"learner.micro_batch_size={args.global_batch}", f"learner.placement.cpus={threads}",
                               f"run.num_cpus={threads}"))
    rows.append((f"rlhf_ray, 1 rank, ZeRO-0, {threads} threads", one))
    # This machine's speed drifts by tens of percent between minutes (a shared VM): measure the baseline
    # again at the end, and compare against the mean of both.
    plain_again = plain_in_fresh_process()
    rows.insert(1, ("plain torch again (after the others)", plain_again))
    plain = (plain + plain_again) / 2

    print(f"\nSFT throughput: tiny:{args.preset}, global batch {args.global_batch}, fp32, "
          f"median over {args.steps} steps after {WARMUP} warm-up, {threads} cores")
    print(f"{'setup':44} {'tokens/s':>10} {'vs plain (mean of both runs)':>9}")
    for name, rate in rows:
        print(f"{name:44} {rate:10.0f} {rate / plain:8.2f}x")


if __name__ == "__main__":
    main()
