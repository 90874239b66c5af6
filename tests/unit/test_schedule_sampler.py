"""Learning-rate schedule, DeepSpeed config, step sampler, step count and the run directory's checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_ray.config import DataConfig, LearnerConfig, SFTConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.distributed.deepspeed_setup import (build_lr_scheduler, deepspeed_config, lr_multiplier,
                                                  optimizer_name)
from rlhf_ray.stages.common import RunDir, StepSampler, read_trainer_state, total_steps

# -- learning-rate schedule -------------------------------------------------------------------------------


def test_warmup_ramps_linearly_to_one():
    got = [lr_multiplier(s, 100, 4, "cosine", 0.1) for s in range(4)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_multiplier(4, 100, 4, "cosine", 0.1) == pytest.approx(1.0)  # decay starts at the peak


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_the_same_for_every_schedule(schedule):
    assert lr_multiplier(1, 50, 10, schedule, 0.0) == pytest.approx(0.2)


def test_constant_stays_at_one_after_warmup():
    assert [lr_multiplier(s, 20, 5, "constant", 0.1) for s in (5, 10, 19, 20, 100)] == [1.0] * 5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 1.0])
def test_decay_ends_at_min_ratio_and_stays(schedule, warmup, min_ratio):
    total = 23
    assert lr_multiplier(warmup, total, warmup, schedule, min_ratio) == pytest.approx(1.0)
    assert lr_multiplier(total, total, warmup, schedule, min_ratio) == pytest.approx(min_ratio)
    assert lr_multiplier(total + 50, total, warmup, schedule, min_ratio) == pytest.approx(min_ratio)
    values = [lr_multiplier(s, total, warmup, schedule, min_ratio) for s in range(warmup, total + 1)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # never increases
    assert min(values) >= min_ratio - 1e-12


def test_linear_decay_values():
    # warmup 2, total 12: progress (step - 2) / 10
    assert lr_multiplier(7, 12, 2, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(7, 12, 2, "linear", 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_multiplier(4, 12, 2, "linear", 0.0) == pytest.approx(0.8)


def test_cosine_midpoint_is_halfway_between_peak_and_floor():
    assert lr_multiplier(60, 110, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(50, 100, 0, "cosine", 0.0) == pytest.approx(0.5)
    # a quarter of the way: (1 + cos(pi/4)) / 2
    assert lr_multiplier(25, 100, 0, "cosine", 0.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_no_decay_when_warmup_covers_the_run():
    assert lr_multiplier(10, 5, 5, "cosine", 0.1) == 1.0
    assert lr_multiplier(0, 0, 0, "linear", 0.1) == 1.0


def test_lr_scheduler_follows_the_multiplier():
    cfg = LearnerConfig(lr=0.5, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.0)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=6)
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.5, 0.375, 0.25, 0.125, 0.0])


# -- DeepSpeed config -------------------------------------------------------------------------------------

def test_deepspeed_config_of_the_defaults():
    cfg = LearnerConfig(num_ranks=2, micro_batch_size=4, grad_accum=3, max_grad_norm=0.5)
    ds = deepspeed_config(cfg, torch.float32)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 4 * 3 == cfg.global_batch_size
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert ds["zero_allow_untested_optimizer"] is True
    json.dumps(ds)  # DeepSpeed reads it as JSON


@pytest.mark.parametrize("dtype, bf16, fp16", [(torch.float32, False, False), (torch.bfloat16, True, False),
                                               (torch.float16, False, True)])
def test_deepspeed_precision_follows_dtype(dtype, bf16, fp16):
    ds = deepspeed_config(LearnerConfig(), dtype)
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is fp16


def test_deepspeed_config_with_offload():
    ds = deepspeed_config(LearnerConfig(zero_stage=2, offload_optimizer=True), torch.bfloat16)
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}


def test_deepspeed_config_stage_3():
    ds = deepspeed_config(LearnerConfig(zero_stage=3), torch.bfloat16)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
    ds = deepspeed_config(LearnerConfig(zero_stage=3, offload_optimizer=True), torch.bfloat16)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_config_low_stages_have_only_the_stage(stage):
    assert deepspeed_config(LearnerConfig(zero_stage=stage), torch.float32)["zero_optimization"] == \
        {"stage": stage}


def test_optimizer_name():
    assert optimizer_name(LearnerConfig()) == "adamw"
    assert optimizer_name(LearnerConfig(offload_optimizer=True)) == "cpu_adam"
    assert optimizer_name(LearnerConfig(optimizer="fused_adam", offload_optimizer=True)) == "fused_adam"


# -- step sampler -----------------------------------------------------------------------------------------

def flat(shards: list[list[int]]) -> list[int]:
    return [r for shard in shards for r in shard]


@pytest.mark.parametrize("num_rows, global_batch, num_ranks", [(100, 12, 3), (64, 16, 4), (7, 7, 1), (50, 8, 2)])
def test_shards_are_disjoint_and_equal_sized(num_rows, global_batch, num_ranks):
    sampler = StepSampler(num_rows, global_batch, num_ranks, seed=0)
    for step in range(3 * sampler.steps_per_epoch):
        shards = sampler.shards(step)
        assert len(shards) == num_ranks
        assert all(len(s) == global_batch // num_ranks for s in shards)
        rows = flat(shards)
        assert len(set(rows)) == len(rows) == global_batch
        assert all(0 <= r < num_rows and isinstance(r, int) for r in rows)


def test_shards_are_a_pure_function_of_seed_and_step():
    a = StepSampler(100, 10, 2, seed=5)
    b = StepSampler(100, 10, 2, seed=5)
    order = [37, 3, 0, 12, 3, 25]  # any order, repeats: nothing is stateful (resume needs only the step)
    assert [a.shards(s) for s in order] == [b.shards(s) for s in order]
    assert a.shards(3) == a.shards(3)
    assert StepSampler(100, 10, 2, seed=6).shards(0) != a.shards(0)


def test_every_row_once_per_epoch_when_the_batch_divides_the_rows():
    sampler = StepSampler(60, 12, 3, seed=1)
    assert sampler.steps_per_epoch == 5
    for epoch in range(3):
        rows = flat([r for s in range(epoch * 5, epoch * 5 + 5) for r in sampler.shards(s)])
        assert sorted(rows) == list(range(60))


def test_drop_last_leaves_out_the_remainder_and_never_repeats_within_an_epoch():
    sampler = StepSampler(50, 8, 2, seed=2)
    assert sampler.steps_per_epoch == 6  # 48 rows, 2 left out
    for epoch in range(4):
        rows = flat([r for s in range(epoch * 6, epoch * 6 + 6) for r in sampler.shards(s)])
        assert len(rows) == len(set(rows)) == 48


def test_a_new_epoch_reshuffles():
    sampler = StepSampler(40, 8, 2, seed=3)
    epoch0 = [flat(sampler.shards(s)) for s in range(5)]
    epoch1 = [flat(sampler.shards(s)) for s in range(5, 10)]
    assert epoch0 != epoch1
    assert sorted(flat(epoch0)) == sorted(flat(epoch1)) == list(range(40))
    assert flat(sampler.shards(0)) != list(range(8))  # shuffled, not in file order


def test_too_small_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match=r"7 rows, fewer than one global batch \(8"):
        StepSampler(7, 8, 2, seed=0)


def test_sampler_from_config():
    cfg = LearnerConfig(num_ranks=3, micro_batch_size=2, grad_accum=2)
    sampler = StepSampler(30, cfg.global_batch_size, cfg.num_ranks, seed=0)
    assert [len(s) for s in sampler.shards(0)] == [cfg.micro_batch_size * cfg.grad_accum] * 3


def test_every_accepted_seed_works():
    cfg = load_config(SFTConfig, None, ["data.train=x", "run.seed=4294967295"])
    StepSampler(10, 2, 1, cfg.run.seed).shards(7)


# -- total steps ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_steps, epochs, per_epoch, expected", [
    (10, 3.0, 100, 10),      # max_steps wins
    (-1, 1.0, 37, 37),
    (-1, 2.0, 37, 74),
    (-1, 0.5, 37, 19),       # a partial epoch rounds up
    (-1, 0.01, 10, 1),       # at least one step
    (-1, 1.1, 100, 110),     # 1.1 * 100 is 110.00000000000001 in floating point
    (-1, 1.1, 50, 55),
    (-1, 0.3, 10, 3),
])
def test_total_steps(max_steps, epochs, per_epoch, expected):
    assert total_steps(max_steps, epochs, per_epoch) == expected


# -- run directory and checkpoints ------------------------------------------------------------------------

def save(run: RunDir, step: int, keep: int = 10) -> None:
    staging = run.staging_path(step)
    (staging / "weights.bin").write_bytes(b"w%d" % step)
    run.commit_checkpoint(staging, step, {"step": step, "stage": "sft"}, keep)


def names(run: RunDir) -> list[str]:
    return [p.name for p in run.list_checkpoints()]


def test_commit_renames_staging_and_writes_state(tmp_path):
    run = RunDir(str(tmp_path), "r")
    staging = run.staging_path(5)
    assert staging.name == "step_00000005.tmp" and staging.is_dir()
    (staging / "weights.bin").write_bytes(b"x")
    final = run.commit_checkpoint(staging, 5, {"step": 5}, keep=2)
    assert final == tmp_path / "r" / "checkpoints" / "step_00000005"
    assert not staging.exists()
    assert (final / "weights.bin").read_bytes() == b"x"
    assert read_trainer_state(final) == {"step": 5}


def test_commit_prunes_oldest_and_keeps_numeric_order(tmp_path):
    run = RunDir(str(tmp_path), "r")
    for step in (9, 10, 100, 1000):
        save(run, step, keep=2)
    assert names(run) == ["step_00000100", "step_00001000"]  # numeric, not 10 < 9 lexicographic


def test_commit_replaces_a_checkpoint_of_the_same_step(tmp_path):
    run = RunDir(str(tmp_path), "r")
    save(run, 4)
    staging = run.staging_path(4)
    (staging / "weights.bin").write_bytes(b"new")
    run.commit_checkpoint(staging, 4, {"step": 4}, keep=3)
    assert names(run) == ["step_00000004"]
    assert (run.checkpoint_path(4) / "weights.bin").read_bytes() == b"new"


def test_staging_path_clears_a_stale_staging_dir(tmp_path):
    run = RunDir(str(tmp_path), "r")
    (run.staging_path(3) / "half_written").write_text("x")
    assert list(run.staging_path(3).iterdir()) == []


def test_resume_auto(tmp_path):
    run = RunDir(str(tmp_path), "r")
    assert run.find_resume_checkpoint("auto") is None  # nothing there yet
    save(run, 2)
    save(run, 6)
    assert run.find_resume_checkpoint("auto") == run.checkpoint_path(6)


def test_staging_dir_is_never_a_checkpoint(tmp_path):
    run = RunDir(str(tmp_path), "r")
    save(run, 2)
    # a crash after writing the state but before the rename leaves a complete-looking .tmp dir
    staging = run.staging_path(8)
    (staging / "trainer_state.json").write_text(json.dumps({"step": 8}))
    (run.checkpoints / "step_00000009.tmp").mkdir()
    (run.checkpoints / "step_9").mkdir()
    (run.checkpoints / "step_000000010").mkdir()
    (run.checkpoints / "step_00000011").write_text("a file, not a dir")
    assert names(run) == ["step_00000002"]
    assert run.find_resume_checkpoint("auto") == run.checkpoint_path(2)
    save(run, 3, keep=1)  # pruning leaves other entries alone
    assert names(run) == ["step_00000003"] and staging.is_dir()


def test_resume_never_with_checkpoints_is_a_config_error(tmp_path):
    run = RunDir(str(tmp_path), "r")
    assert run.find_resume_checkpoint("never") is None
    (run.checkpoints / "step_00000001.tmp").mkdir(parents=True)
    assert run.find_resume_checkpoint("never") is None  # a staging dir is not a checkpoint
    save(run, 7)
    with pytest.raises(ConfigError) as info:
        run.find_resume_checkpoint("never")
    msg = str(info.value)
    assert "run.resume=never" in msg and "step_00000007" in msg and "run.resume=auto" in msg


def test_resume_from_a_path(tmp_path):
    other = RunDir(str(tmp_path), "other")
    save(other, 3)
    run = RunDir(str(tmp_path), "r")
    assert run.find_resume_checkpoint(str(other.checkpoint_path(3))) == other.checkpoint_path(3)
    with pytest.raises(ConfigError, match="run.resume: .* not a checkpoint directory"):
        run.find_resume_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="trainer_state.json"):
        run.find_resume_checkpoint(str(other.checkpoints))


def test_prepare_writes_the_config_and_refuses_before_touching_anything(tmp_path):
    cfg = SFTConfig(data=DataConfig(train="t.jsonl"))
    run = RunDir(str(tmp_path), "r")
    assert run.prepare(cfg, "auto") is None
    assert load_config(SFTConfig, run.path / "config.yaml") == cfg
    save(run, 1)
    assert run.prepare(cfg, "auto") == run.checkpoint_path(1)
    (run.path / "config.yaml").unlink()
    with pytest.raises(ConfigError):
        run.prepare(cfg, "never")
    assert not (run.path / "config.yaml").exists()
