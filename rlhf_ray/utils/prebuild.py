"""Build ahead what would otherwise be built on first use: `python -m rlhf_ray.utils.prebuild`.

- DeepSpeed's shared-memory comm op for CPU ranks (about 100 s on 2 cores, once per cache);
- the tiny offline models used by tests and the demo.
"""

from __future__ import annotations

import os
import time


def main() -> None:
    from rlhf_ray.models.tiny import cache_dir, ensure_tiny_model

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    for preset in ("tiny", "llama", "chatml"):  # the three chat families the tests and demo use
        began = time.perf_counter()
        path = ensure_tiny_model(preset)
        print(f"[prebuild] tiny model {preset!r}: {path} ({time.perf_counter() - began:.1f} s)")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        began = time.perf_counter()
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()
        print(f"[prebuild] DeepSpeed shm comm op ready in {os.environ['TORCH_EXTENSIONS_DIR']} "
              f"({time.perf_counter() - began:.1f} s)")


if __name__ == "__main__":
    main()
