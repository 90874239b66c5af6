"""RLHF memory soak: many tiny RLHF steps, every process's resident memory sampled as the run goes.

    python scripts/soak_rlhf.py [--steps 1000] [--every 50] [--warmup 200] [--preset tiny] [--name soak]

Runs the RLHF stage as `run_rlhf` does (same public functions, same roles) on a random-init `tiny:<preset>`
policy with GRPO, the task checker as reward and tiny batches (4 prompts x 2 samples, 8 new tokens), no
checkpoints and no evaluation during the run. After the first step and every `--every` steps it records, per
process: RSS (resident, including shared pages such as the Ray object store's mmap and shared libraries) and
USS (pages private to the process: what a leak grows). Processes are grouped by role: the driver itself,
each actor of each role (with its child processes: vLLM's engine core when generator.in_process is false),
Ray's task workers (make_experience, concat_tables) and Ray's own daemons (gcs_server, raylet, ...).

Writes `<run dir>/memory.json` and `memory.csv` and prints, per process group, RSS MB at each sample and
the growth from the warm-up sample to the last. Goal: flat within 10% after warm-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL_PCT = 10.0
MB = 2**20


# -- pure parts: sample points, growth, table ------------------------------------------------------------------
def sample_points(steps: int, every: int) -> list[int]:
    """Completed-step counts after which memory is sampled: after the first step, every `every`, and the last."""
    if steps < 1 or every < 1:
        raise ValueError(f"--steps and --every must be >= 1, got {steps} and {every}")
    return sorted({1, steps, *range(every, steps + 1, every)})


def warmup_index(points: Sequence[int], warmup: int) -> int:
    """Index of the first sample taken at or after `warmup` completed steps (the last one if none is)."""
    for i, step in enumerate(points):
        if step >= warmup:
            return i
    return len(points) - 1


def growth_pct(values: Sequence[float | None], start: int) -> float | None:
    """Percent change from `values[start]` to the last value; None when either is missing or the start is 0."""
    if not values or start >= len(values):
        return None
    first, last = values[start], values[-1]
    if first is None or last is None or first <= 0:
        return None
    return 100.0 * (last - first) / first


def format_table(points: Sequence[int], series: dict[str, list[float | None]], start: int,
                 goal_pct: float = GOAL_PCT, name_width: int = 22, col_width: int = 7) -> str:
    """One row per process group: its MB at each sample, then growth % from sample `start` to the last
    (flagged `>` when above `goal_pct`). A missing sample (the process was gone) prints as `-`."""
    header = f"{'group':<{name_width}}" + "".join(f"{p:>{col_width}}" for p in points) + f"{'growth%':>10}"
    marker = f"{'':<{name_width}}" + "".join(f"{'^' if i == start else '':>{col_width}}" for i in range(len(points)))
    lines = [header, marker.rstrip()]
    for name, values in series.items():
        cells = "".join(f"{'-' if v is None else f'{v:.0f}':>{col_width}}" for v in values)
        pct = growth_pct(values, start)
        flag = "" if pct is None else (" >" if pct > goal_pct else "  ")
        grow = f"{'-' if pct is None else f'{pct:+.1f}'}{flag}"
        lines.append(f"{name[:name_width - 1]:<{name_width}}{cells}{grow:>10}")
    return "\n".join(lines)


def series_of(samples: Sequence[dict[str, Any]], key: str, scale: float = MB) -> dict[str, list[float | None]]:
    """{group: [`key` ('rss', 'uss': bytes; 'n': processes) / `scale` at each sample]} from samples of
    {"groups": {group: {key: value}}}; None where a group is missing from a sample."""
    names: list[str] = []
    for sample in samples:
        names += [n for n in sample["groups"] if n not in names]
    return {n: [s["groups"][n][key] / scale if n in s["groups"] else None for s in samples] for n in names}


# -- measuring processes ----------------------------------------------------------------------------------------
def process_memory(pids: Sequence[int], descendants: bool = True) -> dict[str, float]:
    """Summed RSS and USS (bytes) of `pids` (and, with `descendants`, all their child processes, each counted
    once); `n`: how many processes were measured."""
    import psutil

    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *(root.children(recursive=True) if descendants else [])]:
                seen.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            continue
    rss = uss = 0.0
    n = 0
    for proc in seen.values():
        try:
            info = proc.memory_full_info()  # uss reads /proc/<pid>/smaps: fine every few dozen steps
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, uss, n = rss + info.rss, uss + info.uss, n + 1
    return {"rss": rss, "uss": uss, "n": float(n)}


def actor_pids(roles: Any) -> dict[str, int]:
    """{"<role>[i]": pid} of every actor of every role, asked of each actor itself (Ray's `__ray_call__`)."""
    import ray

    groups = {"generator": roles.generators.actors, "learner": roles.learners.group.actors,
              "critic": roles.critic.group.actors if roles.critic is not None else [],
              "reference": roles.reference.actors if roles.reference is not None else [],
              "reward": roles.reward.actors}
    names, refs = [], []
    for role, actors in groups.items():
        for i, actor in enumerate(actors):
            names.append(f"{role}[{i}]")
            refs.append(actor.__ray_call__.remote(lambda self: os.getpid()))
    return dict(zip(names, ray.get(refs)))


def process_label(cmdline: Sequence[str], name: str) -> str:
    """A Ray process's group: `ray task workers` for worker processes (their title starts `ray::`), else the
    daemon's program (`gcs_server`, `raylet`) or, for a Python daemon, its script (`log_monitor.py`)."""
    if cmdline and cmdline[0].startswith("ray::"):
        return "ray task workers"
    program = Path(cmdline[0]).name if cmdline else name
    if program.startswith("python"):
        program = next((Path(a).name for a in cmdline[1:] if a.endswith(".py")), program)
    return f"ray {program}"


def other_ray_processes(actors: dict[str, int]) -> dict[str, list[int]]:
    """The driver's descendants outside the actors' process trees, by `process_label` (a local Ray instance is
    started by the driver, so its daemons and workers are the driver's descendants)."""
    import psutil

    in_actor_trees = set(actors.values())
    for pid in actors.values():
        try:
            in_actor_trees.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    out: dict[str, list[int]] = {}
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in in_actor_trees:
            continue
        try:
            label = process_label(proc.cmdline(), proc.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out.setdefault(label, []).append(proc.pid)
    return out


def sample_memory(roles: Any) -> dict[str, dict[str, float]]:
    """{group: {"rss", "uss", "n"}}: the driver (itself only), every actor with its child processes, Ray's
    task workers and each Ray daemon (each process alone: the raylet's children are the workers)."""
    groups = {"driver": process_memory([os.getpid()], descendants=False)}
    actors = actor_pids(roles)
    groups.update({name: process_memory([pid]) for name, pid in actors.items()})
    for label, pids in sorted(other_ray_processes(actors).items()):
        groups[label] = process_memory(pids, descendants=False)
    return groups


# -- the run ----------------------------------------------------------------------------------------------------
def soak_loop(base: type, points: Sequence[int], samples: list[dict[str, Any]]) -> type:
    """`base` (RLHFLoop) with a memory sample appended to `samples` after each step whose completed count is in
    `points`; each sample carries the seconds spent in steps so far (sampling excluded)."""
    wanted = set(points)

    class SoakLoop(base):
        step_seconds = 0.0

        def step(self, step: int) -> dict[str, Any]:
            began = time.perf_counter()
            stats = super().step(step)
            self.step_seconds += time.perf_counter() - began
            if step + 1 in wanted:
                sampled = time.perf_counter()
                samples.append({"step": step + 1, "step_seconds": round(self.step_seconds, 3),
                                "groups": sample_memory(self.roles)})
                samples[-1]["sample_seconds"] = round(time.perf_counter() - sampled, 3)
            return stats

    return SoakLoop


def soak_config(args: argparse.Namespace, work: Path) -> Any:
    from rlhf_ray.config import RLHFConfig
    from rlhf_ray.config_loader import load_config
    from rlhf_ray.data.synthetic import write_sft_dataset

    files = write_sft_dataset(work / "data", tasks=("reverse", "sort"), n_train=2000, n_eval=32)
    root = Path(__file__).resolve().parent.parent
    return load_config(RLHFConfig, root / "configs/tiny-cpu/rlhf.yaml", [
        f"policy.path=tiny:{args.preset}", f"data.train={files['train']}", f"data.eval={files['eval']}",
        "eval.num_generate=4", "eval.num_print=0", "eval.at_start=false", f"run.output_dir={args.output_dir}",
        f"run.name={args.name}", "run.resume=never", f"run.max_steps={args.steps}", "run.log_every=50",
        "run.eval_every=0", "run.save_every=0", "run.save_rollouts_every=0",
        "reward.functions=[{path: 'rlhf_ray.rewards.tasks:task_score'}]", "algorithm.advantage=grpo",
        "algorithm.prompts_per_step=4", "generator.samples_per_prompt=2", "generator.max_new_tokens=8",
        "generator.cpu_kv_cache_gib=0.125", "learner.micro_batch_size=4", *args.override])


def run_soak(cfg: Any, points: Sequence[int]) -> tuple[Path, list[dict[str, Any]], float]:
    """The RLHF stage (`run_rlhf`) driven by `SoakLoop`: (run dir, samples, seconds in steps)."""
    from rlhf_ray.stages.rlhf import RLHFLoop, run_rlhf

    samples: list[dict[str, Any]] = []
    result = run_rlhf(cfg, loop_cls=soak_loop(RLHFLoop, points, samples))
    return result.run_dir, samples, samples[-1]["step_seconds"]


def write_results(out: Path, samples: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """`memory.json` (summary and every sample) and `memory.csv` (step, group, processes, rss_mb, uss_mb)."""
    (out / "memory.json").write_text(json.dumps({**summary, "samples": samples}, indent=1))
    with open(out / "memory.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "group", "processes", "rss_mb", "uss_mb"])
        for sample in samples:
            for group, m in sample["groups"].items():
                writer.writerow([sample["step"], group, int(m["n"]), f"{m['rss'] / MB:.1f}", f"{m['uss'] / MB:.1f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="sample memory every N steps (and after step 1)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="growth is measured from the first sample at or after this many steps")
    parser.add_argument("--preset", default="tiny", help="tiny:<preset> policy")
    parser.add_argument("--name", default="soak")
    parser.add_argument("--output-dir", default=None, help="runs go here (default: a new temp dir)")
    parser.add_argument("override", nargs="*", help="extra dotted config overrides, e.g. generator.in_process=false")
    args = parser.parse_args()
    points = sample_points(args.steps, args.every)
    os.environ.setdefault("RLHF_RAY_CACHE", str(Path(__file__).resolve().parent.parent / ".cache"))
    work = Path(tempfile.mkdtemp(prefix="rlhf_ray_soak_"))
    args.output_dir = args.output_dir or str(work / "runs")
    began = time.perf_counter()
    run_dir, samples, step_seconds = run_soak(soak_config(args, work), points)
    steps = [s["step"] for s in samples]
    start = warmup_index(steps, args.warmup)
    rss, uss = series_of(samples, "rss"), series_of(samples, "uss")
    summary = {"steps": args.steps, "every": args.every, "warmup_step": steps[start], "goal_pct": GOAL_PCT,
               "step_seconds": step_seconds, "seconds_per_step": step_seconds / args.steps,
               "wall_seconds": time.perf_counter() - began, "load_average": os.getloadavg(),
               "growth_pct": {g: {"rss": growth_pct(rss[g], start), "uss": growth_pct(uss[g], start)} for g in rss}}
    write_results(run_dir, samples, summary)
    print(f"\nRSS MB per process group (with children) after N steps; growth from step {steps[start]} (^) to "
          f"{steps[-1]}; goal within {GOAL_PCT:g}%")
    print(format_table(steps, rss, start))
    print("\nUSS MB (private pages only: shared libraries and the object store's shared memory excluded)")
    print(format_table(steps, uss, start))
    print("\nProcesses per group (an actor with its children; Ray's task workers come and go)")
    print(format_table(steps, series_of(samples, "n", scale=1.0), start))
    print(f"\n{args.steps} steps in {step_seconds:.1f} s of steps: {step_seconds / args.steps:.3f} s/step "
          f"({args.steps / step_seconds:.2f} steps/s); load average {os.getloadavg()}; results in {run_dir}")


if __name__ == "__main__":
    main()
