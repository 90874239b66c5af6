"""bf16 against fp32 on this CPU: forward+backward time of the tiny presets, to pick the CPU default dtype.

Prints the CPU's bf16 features (AVX512-BF16, AMX-BF16) and, per preset, the median step time of each dtype,
measured interleaved (fp32, bf16, fp32, ...) so that drift on a shared machine hits both alike.

    .venv/bin/python scripts/bench_dtype.py [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def step_seconds(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    began = time.perf_counter()
    logits = model(input_ids=input_ids).logits
    logits.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - began


def main() -> None:
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.loading import cpu_bf16_features
    from rlhf_ray.models.tiny import resolve_model_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--presets", default="tiny,small,base")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, bf16 features: {cpu_bf16_features()}, "
          f"threads: {args.threads}")
    print(f"{'preset':8} {'params':>8} {'fp32 s':>9} {'bf16 s':>9} {'bf16/fp32':>10}")
    for preset in args.presets.split(","):
        path = resolve_model_path(f"tiny:{preset}")
        models = {dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).train()
                  for dtype in (torch.float32, torch.bfloat16)}
        input_ids = torch.randint(0, models[torch.float32].config.vocab_size, (32, 48))
        times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in models}
        for dtype, model in models.items():
            step_seconds(model, input_ids)  # warm-up (oneDNN kernel selection)
        for _ in range(args.repeats):
            for dtype, model in models.items():
                times[dtype].append(step_seconds(model, input_ids))
        fp32, bf16 = (statistics.median(times[d]) for d in (torch.float32, torch.bfloat16))
        params = sum(p.numel() for p in models[torch.float32].parameters())
        print(f"{preset:8} {params / 1e6:7.2f}M {fp32:9.4f} {bf16:9.4f} {bf16 / fp32:10.2f}")


if __name__ == "__main__":
    main()
