"""`run.log_level`: a short RLHF run (vLLM engine, weight syncs, tied embeddings) in a subprocess with its own
Ray, so that everything its actors print reaches the output the way a user sees it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.data.synthetic import write_sft_dataset

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu" / "rlhf.yaml"
VLLM_INFO = re.compile(r"\bINFO \d\d-\d\d \d\d:\d\d:\d\d \[")  # vLLM's format: "INFO 12-03 16:32:40 [model.py:733]"
SCRIPT = "import sys, rlhf_ray; rlhf_ray.rlhf(sys.argv[1], sys.argv[2:])"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_sft_dataset(tmp_path_factory.mktemp("data"), tasks=("reverse",), n_train=64, n_eval=8, seed=0)


def run_output(data: dict[str, Path], out: Path, level: str) -> str:
    overrides = [f"run.log_level={level}", "policy.path=tiny:tiny", f"data.train={data['train']}",
                 f"data.eval={data['eval']}", f"run.output_dir={out}", f"run.name={level}", "run.resume=never",
                 "run.max_steps=1", "run.eval_every=0", "run.save_every=0", "eval.at_start=false",
                 "eval.num_generate=4", "eval.num_print=0", "algorithm.advantage=grpo", "algorithm.kl_coef=0",
                 "algorithm.prompts_per_step=4", "learner.num_ranks=1", "learner.zero_stage=0",
                 "learner.micro_batch_size=16"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(CONFIG), *overrides], check=False,
                          capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "[rlhf] policy saved to" in output  # the stage's own lines stay
    return output


def test_info_hides_vllm_info_and_the_sync_warning_and_debug_shows_them(data, tmp_path):
    quiet = run_output(data, tmp_path, "info")
    assert not VLLM_INFO.search(quiet), [line for line in quiet.splitlines() if VLLM_INFO.search(line)][:5]
    for noise in ("Failed to load weights", "Ray deduplicates logs", "Started a local Ray instance",
                  "FutureWarning"):
        assert noise not in quiet, noise

    loud = run_output(data, tmp_path, "debug")
    assert VLLM_INFO.search(loud)
    assert "Reloading weights inplace" in loud  # vLLM's INFO line of the weight sync: a sync did run
    assert "Started a local Ray instance" in loud
    assert "Failed to load weights" not in loud  # dropped at every level: expected for a tied head
