"""Shared test set-up: the asset cache, and one local Ray cluster for every test that needs Ray.

The cluster is this session's own: `address="local"`, its own temp dir and its own auth token (Ray 2.60 turns
token auth on by default and would otherwise share `~/.ray/auth_token`). `ray.shutdown()` stops exactly the
processes that `ray.init` started here; nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("RLHF_RAY_CACHE", str(REPO / ".cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["RLHF_RAY_CACHE"]) / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Set before anything imports Ray: its token loader caches what it first reads.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rlhf_ray.models.tiny import resolve_model_path

    return resolve_model_path("tiny:tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (6 logical CPUs on a 2-core machine: the RLHF roles
    reserve 5; on CPU they time-share the cores)."""
    import ray

    from rlhf_ray.distributed.runtime import worker_env_vars

    temp_dir = Path(tempfile.gettempdir()) / "rlhf_ray_tests" / uuid.uuid4().hex[:8]
    temp_dir.mkdir(parents=True)
    # rollout_node/train_node: the custom resources the 2-node GPU preset pins its roles with.
    ray.init(address="local", num_cpus=6, resources={"rollout_node": 8, "train_node": 8}, include_dashboard=False,
             _temp_dir=str(temp_dir), runtime_env={"env_vars": worker_env_vars("cpu")}, log_to_driver=False)
    yield ray
    ray.shutdown()
