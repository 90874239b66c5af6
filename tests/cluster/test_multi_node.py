"""Placement across nodes and the resource checks, on real multi-node Ray clusters started on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from rlhf_ray.config import RLHFConfig, SFTConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.synthetic import make_rows, write_jsonl
from rlhf_ray.distributed.worker_group import PlacementError

HERE = Path(__file__).resolve().parent


def test_roles_are_placed_on_the_nodes_the_config_names(tmp_path):
    prompts = write_jsonl(make_rows(["sort"], 32, seed=1), tmp_path / "prompts.jsonl")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="rr2n_", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    report_file = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(HERE / "two_node_step.py"), str(prompts), str(report_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and report_file.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    gen_node = next(n for n, tags in report["nodes"].items() if "gen_node" in tags)
    learner_node = next(n for n, tags in report["nodes"].items() if "learner_node" in tags)
    assert gen_node != learner_node
    assert report["generator_nodes"] == [gen_node]
    assert report["learner_nodes"] == [learner_node, learner_node]
    # weights crossed from the learner's node to the generator's and arrived intact
    assert report["checksum_ok"] == 1.0 and report["logprob_gap_max"] <= 1e-4


def test_asking_for_more_than_the_cluster_has_fails_fast(ray_cluster, tmp_path):
    """The up-front checks answer (their messages, not the placement timeout's "not ready after ...")."""
    from rlhf_ray.stages.rlhf_roles import Roles
    from rlhf_ray.stages.sft import run_sft

    files = write_jsonl(make_rows(["sort"], 64, seed=1), tmp_path / "train.jsonl")
    cfg = load_config(RLHFConfig, None, [f"data.train={files}", "run.max_steps=1", "learner.device=cuda",
                                         "learner.num_ranks=4", "learner.micro_batch_size=16",
                                         "learner.placement.cpus=0.25", "reference.placement.gpus=0.5"])
    with pytest.raises(PlacementError, match=r"the roles need [\d.]+ GPU in all \(policy learner 4, generators 1"):
        Roles.create(cfg)
    sft = load_config(SFTConfig, None, [f"data.train={files}", f"run.output_dir={tmp_path}", "run.max_steps=1",
                                        "learner.num_ranks=12", "learner.micro_batch_size=2"])
    with pytest.raises(PlacementError, match=r"sft-learner: needs 12 CPU \(12 x 1\) but the cluster has 6"):
        run_sft(sft)
