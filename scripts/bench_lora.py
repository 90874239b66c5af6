"""Learner memory and train-step throughput with and without LoRA (`learner.lora`).

    python scripts/bench_lora.py [--preset chatml-100m] [--steps 10] [--rank 16] [--micro-batch 8]
    python scripts/bench_lora.py --preset tiny --steps 3      # smoke run

Each mode (full fine-tuning, LoRA) runs in a fresh process of its own, so its peak RSS is its own: one learner
rank (the project's `Learner`, DeepSpeed ZeRO on gloo, no Ray) trains SFT steps on the synthetic tasks. Reported:
trainable parameters, optimizer state (MiB), RSS after set-up and peak RSS (MiB), and tokens/s of
`Learner.train_step` (non-padding tokens over its busy seconds, after the warm-up steps). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("full", "lora")


def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def optimizer_state_mib(optimizer) -> float:
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrapper keeps the torch optimizer
    return sum(t.numel() * t.element_size() for state in inner.state.values()
               for t in state.values() if isinstance(t, torch.Tensor)) / 2**20


def child(args: argparse.Namespace) -> dict:
    """One mode in this process: set up a single learner rank, time `train_step`."""
    import torch

    from rlhf_ray.config import SFTConfig
    from rlhf_ray.config_loader import load_config
    from rlhf_ray.data.sft import load_sft_data
    from rlhf_ray.roles.learner import Learner
    from rlhf_ray.roles.objectives import SFTObjective
    from rlhf_ray.stages.common import StepSampler

    torch.set_num_threads(args.threads)
    overrides = [f"model.path={args.model}", f"data.train={args.data}", f"data.max_length={args.max_length}",
                 f"learner.micro_batch_size={args.micro_batch}", f"learner.zero_stage={args.zero_stage}",
                 "learner.num_ranks=1", "learner.lr_schedule=constant"]
    if args.child == "lora":
        overrides += [f"learner.lora.rank={args.rank}", f"learner.lora.alpha={2 * args.rank}"]
    cfg = load_config(SFTConfig, None, overrides)
    learner = Learner(cfg.model, cfg.learner, SFTObjective(), args.steps + args.warmup, 0, "cpu")
    learner.set_distributed_env(0, 1, 0, "127.0.0.1", free_port())
    learner.setup()
    after_setup = rss_mib()
    data = load_sft_data(cfg.data, learner.tokenizer, 0)
    sampler = StepSampler(data.train.num_rows, cfg.learner.global_batch_size, 1, 0)
    tokens = seconds = 0.0
    for step in range(args.steps + args.warmup):
        metrics = learner.train_step(data.train, sampler.shards(step)[0])
        if step >= args.warmup:
            tokens, seconds = tokens + metrics["tokens"], seconds + metrics["busy_seconds"]
    module = learner.engine.module
    return {"mode": args.child,
            "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
            "trainable_m": sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6,
            "optimizer_mib": optimizer_state_mib(learner.optimizer),
            "rss_setup_mib": after_setup,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens_per_s": tokens / seconds,
            "loss": metrics["loss"]}


def format_table(rows: list[dict], preset: str) -> str:
    head = (f"{'mode':<6} {'params M':>9} {'trainable M':>12} {'optim MiB':>10} {'RSS setup MiB':>14} "
            f"{'peak RSS MiB':>13} {'tokens/s':>9}")
    lines = [f"LoRA benchmark, model {preset}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:<6} {r['params_m']:>9.2f} {r['trainable_m']:>12.3f} {r['optimizer_mib']:>10.1f} "
                     f"{r['rss_setup_mib']:>14.0f} {r['peak_rss_mib']:>13.0f} {r['tokens_per_s']:>9.0f}")
    if len(rows) == 2:
        full, lora = rows
        lines.append(f"lora/full: peak RSS x{lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}, "
                     f"tokens/s x{lora['tokens_per_s'] / full['tokens_per_s']:.2f}")
    return "\n".join(lines)


def parent(args: argparse.Namespace) -> None:
    from rlhf_ray.data.synthetic import write_sft_dataset
    from rlhf_ray.models.tiny import resolve_model_path

    model = resolve_model_path(f"tiny:{args.preset}")  # built before any measurement
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lora_"))
    files = write_sft_dataset(work / "data", tasks=("reverse", "sort", "add"), n_train=2000, n_eval=16, seed=0)
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--model", model, "--data", str(files["train"]),
               *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("steps", "warmup", "rank", "micro_batch", "max_length", "zero_stage", "threads"))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "DS_ACCELERATOR": "cpu"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(format_table(rows, args.preset))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="chatml-100m", help="tiny model preset (tiny, small, chatml-100m, ...)")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--max-length", type=int, default=64, help="data.max_length")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the learner")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--workdir", default=None, help="where the data is written (default: a new temp dir)")
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        result = child(args)
        print(json.dumps(result), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
