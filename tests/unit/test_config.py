"""Config loading: YAML + dotted overrides, round trips, and errors that name the key and what is valid."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from rlhf_ray.cli import STAGE_CONFIGS
from rlhf_ray.config import (DataConfig, LearnerConfig, PipelineConfig, RewardConfig,
                             RewardFunctionConfig, RLHFConfig, RunConfig, SFTConfig)
from rlhf_ray.config_loader import ConfigError, config_help, load_config, parse_override, save_config, to_dict

REPO = Path(__file__).resolve().parents[2]
TRAIN = "train.jsonl"  # load_config never opens the data files, so any name will do


def sft(*overrides: str, path: Path | None = None) -> SFTConfig:
    return load_config(SFTConfig, path, [f"data.train={TRAIN}", *overrides])


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def leaf_fields(cls: type, prefix: str = ""):
    """(dotted key, field) of every non-dataclass field, depth first."""
    for f in dataclasses.fields(cls):
        tp = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if tp is not None and dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


# -- round trips and values -------------------------------------------------------------------------------

def test_defaults_need_only_data_train():
    cfg = sft()
    assert cfg.data.train == TRAIN
    assert cfg.learner == LearnerConfig()
    assert cfg.run == RunConfig()


def test_yaml_then_overrides_then_save_round_trips(tmp_path):
    path = write_yaml(tmp_path / "in.yaml", {
        "data": {"train": "a.jsonl", "eval": "b.jsonl", "max_length": 64},
        "learner": {"num_ranks": 2, "lr": "2.0e-3", "adam_betas": [0.8, 0.9]},
        "run": {"name": "x", "num_cpus": 3},
    })
    cfg = load_config(SFTConfig, path, ["learner.lr=3e-4", "data.eval=null", "run.max_steps=7"])
    assert cfg.learner.lr == 3e-4 and cfg.data.eval is None and cfg.run.max_steps == 7
    assert cfg.data.max_length == 64 and cfg.learner.num_ranks == 2 and cfg.run.num_cpus == 3

    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(SFTConfig, tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert not list((tmp_path / "out").glob("*.tmp"))  # written atomically, no staging file left


def test_round_trip_of_every_non_default_value(tmp_path):
    cfg = sft("model.tokenizer=tok", "model.dtype=bfloat16", "model.trust_remote_code=true",
              "data.eval_fraction=0.25", "data.format=messages", "data.overlong=drop",
              "learner.zero_stage=3", "learner.offload_optimizer=true", "learner.adam_betas=[0.5,0.75]",
              "learner.weight_decay=0.1", "learner.lr_schedule=linear", "learner.placement.strategy=SPREAD",
              "run.resume=never", "run.ray_address=auto", "run.epochs=2.5", "eval.at_start=false")
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(SFTConfig, tmp_path / "c.yaml") == cfg
    assert to_dict(cfg)["learner"]["adam_betas"] == [0.5, 0.75]  # tuples are written as YAML lists


@pytest.mark.parametrize("override, key, expected", [
    ("learner.lr=3e-4", "learner.lr", 3e-4),           # YAML 1.1 reads 3e-4 as a string
    ("learner.lr=1", "learner.lr", 1.0),
    ("learner.lr=.5", "learner.lr", 0.5),
    ("data.eval=null", "data.eval", None),
    ("data.eval=held.jsonl", "data.eval", "held.jsonl"),
    ("learner.adam_betas=[0.9,0.99]", "learner.adam_betas", (0.9, 0.99)),
    ("learner.adam_betas=[1, 0]", "learner.adam_betas", (1.0, 0.0)),
    ("learner.offload_optimizer=true", "learner.offload_optimizer", True),
    ("eval.at_start=false", "eval.at_start", False),
    ("learner.micro_batch_size=4.0", "learner.micro_batch_size", 4),
    ("run.name=123", "run.name", "123"),
    ("run.name=a=b", "run.name", "a=b"),               # only the first `=` separates key and value
    ("run.num_cpus=null", "run.num_cpus", None),
    ("run.seed=7", "run.seed", 7),
])
def test_override_values_are_read_as_yaml(override, key, expected):
    section, name = key.split(".")
    value = getattr(getattr(sft(override), section), name)
    assert value == expected and type(value) is type(expected)


def test_override_wins_over_yaml_and_keeps_siblings(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": "a", "max_length": 64},
                                            "learner": {"lr": 0.5, "grad_accum": 3}})
    cfg = load_config(SFTConfig, path, ["learner.lr=0.25", "learner.lr=0.125"])
    assert cfg.learner.lr == 0.125  # the last override wins
    assert cfg.learner.grad_accum == 3 and cfg.data.max_length == 64


def test_overrides_alone_build_a_config():
    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl", "learner.num_ranks=4"])
    assert cfg.learner.num_ranks == 4 and cfg.learner.global_batch_size == 4 * 8 * 1


def test_empty_yaml_file_is_all_defaults(tmp_path):
    cfg = load_config(SFTConfig, write_yaml(tmp_path / "c.yaml", ""), [f"data.train={TRAIN}"])
    assert cfg == sft()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        sft().learner.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("text, parts, value", [
    ("learner.lr=3e-4", ["learner", "lr"], "3e-4"),
    ("a.b.c=[1, 2]", ["a", "b", "c"], [1, 2]),
    (" run.name =x", ["run", "name"], "x"),
    ("run.name=", ["run", "name"], ""),
    ("x=null", ["x"], None),
])
def test_parse_override(text, parts, value):
    assert parse_override(text) == (parts, value)


# -- errors -----------------------------------------------------------------------------------------------

def raises(*overrides: str, path: Path | None = None, cls: type = SFTConfig) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, [f"data.train={TRAIN}", *overrides] if cls is SFTConfig else overrides)
    return str(info.value)


def test_unknown_top_level_key_lists_valid_keys():
    msg = raises("lerner.lr=1")
    assert "lerner" in msg and "top level" in msg
    for key in ("model", "data", "learner", "run", "eval"):
        assert key in msg


def test_unknown_nested_key_names_it_and_lists_the_section_keys():
    msg = raises("learner.learning_rate=1")
    assert "learner.learning_rate" in msg
    assert "valid keys under learner" in msg
    for f in dataclasses.fields(LearnerConfig):
        assert f.name in msg


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": "a", "shuffle": True}})
    msg = raises(path=path)
    assert "data.shuffle" in msg and str(path) in msg


@pytest.mark.parametrize("override, key, expected", [
    ("learner.micro_batch_size=eight", "learner.micro_batch_size", "integer"),
    ("learner.micro_batch_size=2.5", "learner.micro_batch_size", "integer"),
    ("learner.num_ranks=true", "learner.num_ranks", "integer"),          # a bool is not an int
    ("model.trust_remote_code=1", "model.trust_remote_code", "true or false"),  # an int is not a bool
    ("model.trust_remote_code=maybe", "model.trust_remote_code", "true or false"),
    ("learner.lr=fast", "learner.lr", "number"),
    ("learner.lr=true", "learner.lr", "number"),
    ("run.name=[a]", "run.name", "string"),
    ("learner.adam_betas=0.9", "learner.adam_betas", "list"),
    ("learner.adam_betas=[0.9,x]", "learner.adam_betas[1]", "number"),
    ("run.num_cpus=two", "run.num_cpus", "int or null"),
    ("learner=3", "learner", "mapping"),
    ("learner.lr.peak=1", "learner.lr", "number"),
])
def test_wrong_type_names_key_and_expected_type(override, key, expected):
    msg = raises(override)
    assert msg.startswith(key + ":"), msg
    assert expected in msg


@pytest.mark.parametrize("override, key, bound", [
    ("learner.zero_stage=4", "learner.zero_stage", "<= 3"),
    ("learner.zero_stage=-1", "learner.zero_stage", ">= 0"),
    ("data.eval_fraction=1.5", "data.eval_fraction", "< 1.0"),
    ("data.eval_fraction=1", "data.eval_fraction", "< 1.0"),
    ("learner.lr=0", "learner.lr", "> 0.0"),
    ("learner.num_ranks=0", "learner.num_ranks", ">= 1"),
    ("run.num_cpus=0", "run.num_cpus", ">= 1"),
    ("learner.min_lr_ratio=1.01", "learner.min_lr_ratio", "<= 1.0"),
])
def test_out_of_range_names_key_and_bound(override, key, bound):
    msg = raises(override)
    assert msg.startswith(key + ":") and bound in msg, msg


def test_bounds_are_inclusive_where_declared():
    cfg = sft("learner.zero_stage=3", "learner.zero_stage=0", "data.eval_fraction=0", "learner.min_lr_ratio=1")
    assert cfg.learner.zero_stage == 0 and cfg.data.eval_fraction == 0.0 and cfg.learner.min_lr_ratio == 1.0


def test_seed_that_numpy_cannot_take_is_rejected():
    # np.random.seed / default_rng reject negative seeds; the config must, not a Ray actor later.
    assert "run.seed" in raises("run.seed=-1")
    assert sft("run.seed=4294967295").run.seed == 2**32 - 1
    assert "run.seed" in raises("run.seed=4294967296")


@pytest.mark.parametrize("override, key, choices", [
    ("learner.lr_schedule=step", "learner.lr_schedule", ("'constant'", "'linear'", "'cosine'")),
    ("model.dtype=fp32", "model.dtype", ("'auto'", "'float32'", "'bfloat16'", "'float16'")),
    ("data.format=alpaca", "data.format", ("'auto'", "'instruction'", "'messages'")),
    ("learner.placement.strategy=pack", "learner.placement.strategy", ("'PACK'", "'STRICT_SPREAD'")),
])
def test_bad_choice_lists_valid_choices(override, key, choices):
    msg = raises(override)
    assert msg.startswith(key + ":") and "one of" in msg
    for choice in choices:
        assert choice in msg


@pytest.mark.parametrize("text", ["learner.lr", "learner.lr:3e-4", ""])
def test_override_without_equals_sign(text):
    msg = raises(text)
    assert "key=value" in msg and repr(text) in msg


@pytest.mark.parametrize("text", ["=3", ".lr=3", "learner..lr=3"])
def test_override_with_empty_key(text):
    assert "empty key" in raises(text)


def test_override_with_invalid_yaml_value():
    msg = raises("learner.adam_betas=[0.9,")
    assert "learner.adam_betas" in msg and "YAML" in msg


def test_missing_config_file(tmp_path):
    msg = raises(path=tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "does not exist" in msg


def test_config_file_that_is_a_directory(tmp_path):
    assert "does not exist" in raises(path=tmp_path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    path = write_yaml(tmp_path / "c.yaml", text)
    msg = raises(path=path)
    assert str(path) in msg and "mapping" in msg and kind in msg


def test_invalid_yaml_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", "learner: {lr: [\n")
    msg = raises(path=path)
    assert str(path) in msg and "not valid YAML" in msg


def test_sft_config_needs_data_train():
    with pytest.raises(ConfigError, match=r"^data\.train: required"):
        load_config(SFTConfig, None, [])
    with pytest.raises(ConfigError, match=r"^data\.train: required"):
        load_config(SFTConfig, None, ["data.train="])
    with pytest.raises(ConfigError, match=r"data\.train"):
        SFTConfig()


def test_cross_field_rules_of_learner_config():
    assert "learner.adam_betas" in raises("learner.adam_betas=[0.9]")
    assert "learner.adam_betas" in raises("learner.adam_betas=[0.9,0.99,0.999]")
    msg = raises("learner.offload_optimizer=true", "learner.zero_stage=0")
    assert "learner.offload_optimizer" in msg and "learner.zero_stage" in msg
    for stage in (1, 2, 3):
        assert sft("learner.offload_optimizer=true", f"learner.zero_stage={stage}").learner.offload_optimizer
    with pytest.raises(ConfigError, match="adam_betas"):
        LearnerConfig(adam_betas=(0.9,))
    with pytest.raises(ConfigError, match="offload_optimizer"):
        LearnerConfig(offload_optimizer=True, zero_stage=0)


def test_cross_field_error_from_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": "a"},
                                            "learner": {"zero_stage": 0, "offload_optimizer": True}})
    msg = raises(path=path)
    assert "learner.offload_optimizer" in msg and str(path) in msg


def test_every_error_is_a_value_error():
    # callers that only know ValueError (argparse-style code, tests) still catch config errors
    assert issubclass(ConfigError, ValueError)


# -- help -------------------------------------------------------------------------------------------------

def test_config_help_lists_every_leaf_key_with_its_help():
    text = config_help(SFTConfig)
    leaves = list(leaf_fields(SFTConfig))
    assert len(leaves) > 30
    for key, f in leaves:
        assert re.search(rf"^  {re.escape(key)} = ", text, re.MULTILINE), key
        assert f.metadata["help"] in text, key
    for section in ("model", "data", "learner", "run", "eval"):
        assert re.search(rf"^{section}:  \S", text, re.MULTILINE), section


def test_config_help_shows_defaults_types_and_bounds():
    text = config_help(SFTConfig)
    assert "  learner.zero_stage = 2   [int; >= 0, <= 3]" in text
    assert "  learner.adam_betas = [0.9, 0.95]   [a list of float]" in text
    assert "  data.eval = null   [str or null]" in text
    assert "  learner.lr_schedule = \"cosine\"   [one of 'constant', 'linear', 'cosine']" in text


# -- the shipped configs ----------------------------------------------------------------------------------

SHIPPED = sorted((REPO / "configs").rglob("*.y*ml"))


def test_configs_directory_holds_configs():
    assert SHIPPED, "no YAML file under configs/"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_loads_with_its_stage_config(path):
    stage = path.stem.split("-")[0]  # rlhf-8gpu.yaml is an rlhf config
    assert stage in STAGE_CONFIGS, (f"{path}: file stem names no stage; stages: "
                                    f"{', '.join(STAGE_CONFIGS)}")
    cls = STAGE_CONFIGS[stage]
    data = yaml.safe_load(path.read_text()) or {}
    overrides = [] if "data" not in data or data["data"].get("train") else [f"data.train={TRAIN}"]
    cfg = load_config(cls, path, overrides)
    assert isinstance(cfg, cls)
    if isinstance(cfg, SFTConfig):
        assert isinstance(cfg.data, DataConfig)
        # the batch fits the per-rank split the sampler makes
        assert cfg.learner.global_batch_size % cfg.learner.num_ranks == 0


# -- RLHF ---------------------------------------------------------------------------------------------------

def rlhf(*overrides: str, path: Path | None = None) -> RLHFConfig:
    return load_config(RLHFConfig, path, [f"data.train={TRAIN}", "run.max_steps=3", *overrides])


def test_rlhf_defaults_need_only_data_train_and_max_steps():
    cfg = rlhf()
    assert cfg.run.max_steps == 3 and cfg.data.train == TRAIN
    assert cfg.rollouts_per_step == 64  # 16 prompts x 4 samples
    assert cfg.reward.model is None
    # No reward function by default: the synthetic task checker raises on any prompt without a `task`.
    assert cfg.reward.functions == ()
    assert cfg.algorithm.advantage == "gae" and cfg.algorithm.kl_in == "reward"


def test_rlhf_needs_max_steps():
    with pytest.raises(ConfigError, match="run.max_steps"):
        load_config(RLHFConfig, None, [f"data.train={TRAIN}"])


def test_tiny_cpu_rlhf_config_loads():
    cfg = load_config(RLHFConfig, REPO / "configs" / "tiny-cpu" / "rlhf.yaml")
    assert cfg.policy.path == "runs/sft-tiny/model"
    assert cfg.learner.num_ranks == 2 and cfg.learner.micro_batch_size == 32
    assert cfg.rollouts_per_minibatch_per_rank(cfg.learner) == 32
    assert cfg.rollouts_per_minibatch_per_rank(cfg.critic.learner) == 64
    assert cfg.reward.functions == (RewardFunctionConfig("rlhf_ray.rewards.tasks:task_score", 1.0),)


@pytest.mark.parametrize("overrides", [
    ["learner.micro_batch_size=7"],                                    # 64 per rank, not a multiple of 7
    ["algorithm.num_minibatches=3"],                                   # 64 rollouts do not split in 3
    ["learner.num_ranks=3", "critic.learner.num_ranks=1"],             # nor over 3 ranks
    ["algorithm.prompts_per_step=5"],                                  # 20 rollouts, not a multiple of 8
    ["generator.samples_per_prompt=3", "learner.micro_batch_size=5"],  # 48 per rank, not a multiple of 5
])
def test_rlhf_rollouts_must_split_into_micro_batches_and_the_error_names_the_keys(overrides):
    with pytest.raises(ConfigError) as err:
        rlhf(*overrides, "critic.learner.micro_batch_size=1")
    text = str(err.value)
    for key in ("algorithm.prompts_per_step", "generator.samples_per_prompt", "algorithm.num_minibatches",
                "learner.num_ranks", "learner.micro_batch_size"):
        assert key in text, text


def test_rlhf_critic_learner_must_split_too():
    """The critic trains on the same minibatches (gae only), so its learner group is checked as well."""
    with pytest.raises(ConfigError, match=r"critic\.learner\.micro_batch_size=48"):
        rlhf("critic.learner.micro_batch_size=48")
    cfg = rlhf("critic.learner.micro_batch_size=48", "algorithm.advantage=grpo")  # no critic: not checked
    assert cfg.critic.learner.micro_batch_size == 48


def test_rlhf_divisible_splits_load():
    cfg = rlhf("algorithm.prompts_per_step=6", "generator.samples_per_prompt=4", "algorithm.num_minibatches=2",
               "learner.num_ranks=3", "learner.micro_batch_size=2", "critic.learner.micro_batch_size=4")
    assert cfg.rollouts_per_minibatch_per_rank(cfg.learner) == 4


def test_reward_needs_a_model_or_functions():
    with pytest.raises(ConfigError, match="reward.model .* and/or reward.functions"):
        RewardConfig().require_source()
    with pytest.raises(ConfigError, match="reward.functions"):
        rlhf("reward.functions=[]").reward.require_source()
    assert rlhf("reward.functions=[]", "reward.model=runs/rm/model").reward.model == "runs/rm/model"
    # A pipeline without an rm stage needs a rule reward up front; with one, the trained model is the reward.
    sft = [f"sft.data.train={TRAIN}", f"rlhf.data.train={TRAIN}", "rlhf.run.max_steps=2"]
    with pytest.raises(ConfigError, match="reward.functions"):
        load_config(PipelineConfig, None, sft)
    with_rm = load_config(PipelineConfig, None, [*sft, f"rm.data.train={TRAIN}"])
    assert with_rm.rlhf.reward.functions == ()


@pytest.mark.parametrize("top_p", [0.9, 0.5])
def test_rlhf_refuses_nucleus_sampling(top_p):
    with pytest.raises(ConfigError, match=r"generator\.top_p=.*must be 1\.0"):
        rlhf(f"generator.top_p={top_p}")
    assert rlhf("generator.top_p=1.0", "generator.temperature=0.7").generator.temperature == 0.7
