"""Where the PPO critic starts: it reads the policy's token ids, so only from a model with the policy's vocabulary."""

from __future__ import annotations

import pytest

from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.models.tiny import resolve_model_path
from rlhf_ray.stages.rlhf_roles import critic_start


def config(*overrides: str) -> RLHFConfig:
    return load_config(RLHFConfig, None, ["data.train=x.jsonl", "run.max_steps=1", "policy.path=tiny:llama",
                                          *overrides])


def test_the_reward_model_seeds_the_critic_only_when_it_reads_the_same_tokens():
    same, other = resolve_model_path("tiny:llama"), resolve_model_path("tiny:chatml")
    assert critic_start(config(f"reward.model={same}")) == same
    assert critic_start(config(f"reward.model={other}")) == "tiny:llama"  # ChatML ids would be out of range
    assert critic_start(config("reward.functions=[{path: 'a.b:c'}]")) == "tiny:llama"


def test_an_explicit_critic_with_another_vocabulary_is_refused():
    llama = resolve_model_path('tiny:llama')
    assert critic_start(config(f"critic.path={llama}")) == llama
    with pytest.raises(ConfigError, match=r"critic\.path=.*tokenizer differs from the policy's"):
        critic_start(config(f"critic.path={resolve_model_path('tiny:chatml')}"))
