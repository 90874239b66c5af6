"""One RLHF step on a two-node Ray cluster on this machine (run by test_multi_node.py in its own process).

Node A (the head) carries a `gen_node` resource, node B a `learner_node` resource; the config places the
generator and scorers on A and the learner ranks on B. Writes a JSON report of where each actor ran to the file
named by its second argument (not stdout, where the actors' streamed logs can land on the same line).
"""

import json
import os
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.prompts import load_prompts
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.stages.common import RunDir
from rlhf_ray.stages.rlhf import RLHFLoop
from rlhf_ray.stages.rlhf_roles import Roles


def main(prompts_file: str, report_file: str) -> None:
    # RAY_TMPDIR (set by the test) keeps even Ray's "current cluster" file out of the shared /tmp/ray.
    temp = os.environ["RAY_TMPDIR"]
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"gen_node": 10},
                                                              "temp_dir": temp})
    cluster.add_node(num_cpus=3, resources={"learner_node": 10}, temp_dir=temp)
    try:
        ray.init(address=cluster.address)
        out = Path(temp) / "runs"
        cfg = load_config(RLHFConfig, None, [
            "policy.path=tiny:tiny", f"data.train={prompts_file}", "eval.num_generate=4",
            f"run.output_dir={out}", "run.name=two-node", "run.max_steps=1", "algorithm.advantage=grpo",
            "algorithm.prompts_per_step=8", "generator.samples_per_prompt=2", "generator.max_new_tokens=6",
            "generator.cpu_kv_cache_gib=0.25", "learner.num_ranks=2", "learner.micro_batch_size=8",
            "generator.placement.resources={gen_node: 1}", "reference.placement.resources={gen_node: 1}",
            "reward.placement.resources={gen_node: 1}", "learner.placement.resources={learner_node: 1}",
            "sync.verify=every", "reward.functions=[{path: 'rlhf_ray.rewards.tasks:task_score'}]"])
        tokenizer = load_tokenizer(cfg.policy)
        prompts, _ = load_prompts(cfg.data.train, tokenizer, 64)
        roles = Roles.create(cfg)
        try:
            run_dir = RunDir(cfg.run.output_dir, cfg.run.name)
            run_dir.prepare(cfg, "never")
            loop = RLHFLoop(cfg, roles, ray.put(prompts), prompts.num_rows, ray.put(prompts.slice(0, 4)), 4,
                            run_dir)
            metrics = loop.step(0)
            report = {
                "nodes": {n["NodeID"]: sorted(k for k in n["Resources"] if k.endswith("_node"))
                          for n in ray.nodes() if n["Alive"]},
                "learner_nodes": roles.learners.group.node_ids,
                "generator_nodes": [info["node_id"] for info in roles.generators.info],
                "checksum_ok": metrics["sync/checksum_ok"], "logprob_gap_max": metrics["logprob_gap/max"],
            }
        finally:
            roles.shutdown()
        Path(report_file).write_text(json.dumps(report))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
