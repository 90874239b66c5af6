"""rlhf_ray: SFT, reward modelling and RLHF on Ray, vLLM and DeepSpeed.

The stages as functions (`rlhf_ray.api`): `sft`, `reward_model`, `dpo`, `rlhf`, `pipeline`. Importing the package
loads none of torch, Ray or vLLM; a stage does when it runs.
"""

from rlhf_ray.api import dpo, pipeline, reward_model, rlhf, sft

__version__ = "0.1.0"

__all__ = ["__version__", "dpo", "pipeline", "reward_model", "rlhf", "sft"]
