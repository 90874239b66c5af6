"""What a resume checks and cleans up before training goes on (`RunDir.prepare`, `stages.resume_check`,
`utils.durable`): the config must keep the checkpoint's model, algorithm and data; half-written checkpoints are
never resumed and are removed; metrics logged after the checkpoint are dropped, in metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhf_ray.config import DPOConfig, RLHFConfig, RMConfig, SFTConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.stages.common import RunDir, read_metrics
from rlhf_ray.utils.durable import rewind_metrics
from rlhf_ray.stages.resume_check import RESUME_LOCKED_KEYS, is_locked, locked_differences

SFT = ["data.train=t.jsonl", "data.eval=e.jsonl", "run.max_steps=10"]


def save(run: RunDir, step: int, keep: int = 10) -> Path:
    staging = run.staging_path(step)
    (staging / "weights.bin").write_bytes(b"w%d" % step)
    return run.commit_checkpoint(staging, step, {"step": step, "stage": "sft"}, keep)


def started(run: RunDir, cfg, checkpoint_at: int = 4) -> None:
    """`run` as a run with `cfg` leaves it: its config.yaml written by prepare, and a checkpoint."""
    assert run.prepare(cfg, "auto") is None
    save(run, checkpoint_at)


# -- the config of a resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", [
    "model.path=tiny:small", "model.tokenizer=other-tokenizer", "data.train=other.jsonl", "data.eval=null",
    "data.split=validation", "data.eval_fraction=0.1"])
def test_a_resume_that_changes_the_model_or_data_is_refused_naming_the_key(tmp_path, change):
    run = RunDir(str(tmp_path), "r")
    started(run, load_config(SFTConfig, None, SFT))
    before = (run.path / "config.yaml").read_text()
    key = change.split("=")[0]
    with pytest.raises(ConfigError) as info:
        run.prepare(load_config(SFTConfig, None, [*SFT, change]), "auto")
    message = str(info.value)
    assert f"  {key}: " in message and " -> " in message and "run.resume_override=true" in message
    assert "step_00000004" in message and str(run.path / "config.yaml") in message
    assert (run.path / "config.yaml").read_text() == before  # the old config stays what it was


def test_every_differing_key_is_listed_old_to_new(tmp_path):
    run = RunDir(str(tmp_path), "r")
    started(run, load_config(SFTConfig, None, SFT))
    with pytest.raises(ConfigError) as info:
        run.prepare(load_config(SFTConfig, None, [*SFT, "model.path=tiny:small", "data.train=new.jsonl"]), "auto")
    lines = [line.strip() for line in str(info.value).splitlines() if line.startswith("  ")]
    assert lines == ["data.train: 't.jsonl' -> 'new.jsonl'", "model.path: 'tiny:tiny' -> 'tiny:small'"]


def test_schedule_cluster_eval_and_names_may_change(tmp_path):
    run = RunDir(str(tmp_path), "r")
    started(run, load_config(SFTConfig, None, SFT))
    free = ["run.max_steps=20", "run.log_every=5", "run.eval_every=3", "run.save_every=2", "run.ray_address=auto",
            "run.num_cpus=4", "eval.num_print=0", "eval.at_start=false", "learner.num_ranks=2",
            "run.keep_checkpoints=5", "run.loggers=[]", "data.max_eval_samples=8"]
    cfg = load_config(SFTConfig, None, [*SFT, *free])
    assert run.prepare(cfg, "auto") == run.checkpoint_path(4)
    assert load_config(SFTConfig, run.path / "config.yaml") == cfg  # then the new config is the run's


def test_resume_override_proceeds_and_prints_the_differences(tmp_path, capsys):
    run = RunDir(str(tmp_path), "r")
    started(run, load_config(SFTConfig, None, SFT))
    cfg = load_config(SFTConfig, None, [*SFT, "model.path=tiny:small", "run.resume_override=true"])
    assert run.prepare(cfg, "auto") == run.checkpoint_path(4)
    out = capsys.readouterr().out
    assert "run.resume_override=true" in out and "model.path: 'tiny:tiny' -> 'tiny:small'" in out
    assert load_config(SFTConfig, run.path / "config.yaml") == cfg


def test_a_fresh_start_is_not_compared(tmp_path):
    run = RunDir(str(tmp_path), "r")
    assert run.prepare(load_config(SFTConfig, None, SFT), "auto") is None
    assert run.prepare(load_config(SFTConfig, None, [*SFT, "model.path=tiny:small"]), "auto") is None


def test_a_checkpoint_of_another_run_is_compared_with_that_run_config(tmp_path):
    other = RunDir(str(tmp_path), "other")
    started(other, load_config(SFTConfig, None, SFT), checkpoint_at=3)
    run = RunDir(str(tmp_path), "r")
    path = str(other.checkpoint_path(3))
    with pytest.raises(ConfigError, match="data.train: 't.jsonl' -> 'x.jsonl'"):
        run.prepare(load_config(SFTConfig, None, [*SFT, "data.train=x.jsonl", "run.name=r"]), path)
    assert run.prepare(load_config(SFTConfig, None, [*SFT, "run.name=r"]), path) == other.checkpoint_path(3)


RLHF = ["data.train=p.jsonl", "run.max_steps=4", "reward.model=/rm", "algorithm.advantage=grpo",
        "generator.samples_per_prompt=2", "learner.micro_batch_size=4"]


@pytest.mark.parametrize("change,key", [
    ("policy.path=tiny:small", "policy.path"), ("reference.path=/ref", "reference.path"),
    ("reward.model=/rm2", "reward.model"), ("critic.path=/critic", "critic.path"),
    ("algorithm.kl_coef=0.5", "algorithm.kl_coef"), ("algorithm.advantage=rloo", "algorithm.advantage"),
    ("data.eval=q.jsonl", "data.eval")])
def test_rlhf_locks_its_models_algorithm_and_prompts(tmp_path, change, key):
    run = RunDir(str(tmp_path), "r")
    started(run, load_config(RLHFConfig, None, RLHF))
    with pytest.raises(ConfigError, match=f"  {key}: "):
        run.prepare(load_config(RLHFConfig, None, [*RLHF, change]), "auto")
    # and the generator, sync and evaluation may change
    free = ["generator.max_new_tokens=7", "generator.temperature=0.7", "eval.num_generate=2", "run.max_steps=8"]
    assert run.prepare(load_config(RLHFConfig, None, [*RLHF, *free]), "auto") == run.checkpoint_path(4)


@pytest.mark.parametrize("cls,base,change,key", [
    (DPOConfig, ["data.train=f.jsonl"], "loss.beta=0.5", "loss.beta"),
    (DPOConfig, ["data.train=f.jsonl"], "loss.type=ipo", "loss.type"),
    (RMConfig, ["data.train=f.jsonl"], "loss.ranking_loss=plackett_luce", "loss.ranking_loss"),
    (RMConfig, ["data.train=f.jsonl"], "model.path=tiny:small", "model.path")])
def test_dpo_and_reward_model_lock_their_loss_section(tmp_path, cls, base, change, key):
    run = RunDir(str(tmp_path), "r")
    started(run, load_config(cls, None, base))
    with pytest.raises(ConfigError, match=f"  {key}: "):
        run.prepare(load_config(cls, None, [*base, change]), "auto")


def test_dpo_refuses_a_changed_resume_before_starting_ray_or_its_reference(tmp_path, tiny_tokenizer, monkeypatch):
    import rlhf_ray.stages.dpo as dpo

    rows = [{"prompt": f"sort\n{w}", "chosen": "".join(sorted(w)), "rejected": w} for w in ("cab", "zyx", "fed")]
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["model.path=tiny:tiny", f"data.train={train}", "data.eval_fraction=0.0", f"run.output_dir={tmp_path}",
            "run.name=d"]
    started(RunDir(str(tmp_path), "d"), load_config(DPOConfig, None, base))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started (and the reference logprobs would be computed) before the resume check")

    monkeypatch.setattr(dpo, "ray_session", no_ray)
    with pytest.raises(ConfigError, match="  loss.beta: "):
        dpo.run_dpo(load_config(DPOConfig, None, [*base, "loss.beta=0.7"]))


def test_locked_keys_are_prefixes_and_keys_of_only_one_config_are_not_compared():
    assert is_locked("algorithm.kl_coef") and is_locked("loss.beta") and is_locked("model.path")
    assert not is_locked("algorithms.x") and not is_locked("model.pathology") and not is_locked("run.max_steps")
    assert {"model", "algorithm", "data"} == set(RESUME_LOCKED_KEYS)
    old = {"model": {"path": "a"}, "algorithm": {"kl_coef": 0.1}, "run": {"max_steps": 3}}
    new = {"model": {"path": "a"}, "algorithm": {"kl_coef": 0.1, "new_field": 1}, "run": {"max_steps": 9}}
    assert locked_differences(old, new) == []  # a field added by a later version is no user's change
    new["algorithm"]["kl_coef"] = 0.2
    assert locked_differences(old, new) == [("algorithm.kl_coef", 0.1, 0.2)]


# -- half-written checkpoints -------------------------------------------------------------------------------------
def test_a_step_dir_without_trainer_state_is_not_a_checkpoint(tmp_path):
    run = RunDir(str(tmp_path), "r")
    save(run, 2)
    (run.checkpoints / "step_00000004").mkdir()  # e.g. copied in part by hand
    (run.checkpoints / "step_00000004" / "weights.bin").write_bytes(b"half")
    assert [p.name for p in run.list_checkpoints()] == ["step_00000002"]
    assert run.find_resume_checkpoint("auto") == run.checkpoint_path(2)


def test_prepare_removes_stale_staging_dirs_saying_so(tmp_path, capsys):
    run = RunDir(str(tmp_path), "r")
    started(run, load_config(SFTConfig, None, SFT), checkpoint_at=2)
    staging = run.staging_path(4)
    (staging / "state").mkdir()
    (staging / "state" / "model.pt").write_bytes(b"half")
    (run.checkpoints / "step_00000002.old.tmp").mkdir()  # killed while setting an old checkpoint aside
    capsys.readouterr()
    assert run.prepare(load_config(SFTConfig, None, SFT), "auto") == run.checkpoint_path(2)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_00000002"]
    out = capsys.readouterr().out
    assert "step_00000004.tmp" in out and "step_00000002.old.tmp" in out and "removed" in out


def test_a_staging_dir_named_as_run_resume_is_refused(tmp_path):
    run = RunDir(str(tmp_path), "r")
    staging = run.staging_path(8)
    (staging / "trainer_state.json").write_text(json.dumps({"step": 8}))  # killed just before the rename
    with pytest.raises(ConfigError, match="run.resume: .*step_00000008.tmp .*interrupted"):
        run.prepare(load_config(SFTConfig, None, SFT), str(staging))
    assert staging.is_dir()


def test_commit_makes_every_file_durable_before_the_rename(tmp_path, monkeypatch):
    """The order of the real fsync and rename calls: each file and directory of the staging dir is fsynced before
    the rename that makes it a checkpoint; the checkpoints directory after it."""
    run = RunDir(str(tmp_path), "r")
    save(run, 2)
    staging = run.staging_path(4)
    (staging / "policy" / "state").mkdir(parents=True)
    for name in ("policy/state/model.pt", "policy/rng_rank0.pt", "pending.parquet"):
        (staging / name).write_bytes(b"x")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run.commit_checkpoint(staging, 4, {"step": 4}, keep=1)
    rename = events.index(("replace", str(staging)))
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    expected = {str(staging / n) for n in ("policy/state/model.pt", "policy/rng_rank0.pt", "pending.parquet",
                                           "trainer_state.json", "policy/state", "policy", "")}
    assert {str(Path(p)) for p in expected} <= synced_before
    after = [path for kind, path in events[rename:] if kind == "fsync"]
    assert after.count(str(run.checkpoints)) == 2  # after the rename, and after pruning step 2
    assert [p.name for p in run.list_checkpoints()] == ["step_00000004"]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_00000004"]


# -- metrics after the checkpoint ---------------------------------------------------------------------------------
def write_records(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_rewind_drops_records_after_the_step_and_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 6)]
    records.insert(2, {"step": 2, "split": "eval", "loss": 0.3})
    write_records(path, records, tail='{"step": 6, "split": "tr')  # the kill cut this write short
    assert rewind_metrics(path, 2) == 4  # steps 3, 4, 5 and the cut line
    assert [(m["step"], m["split"]) for m in read_metrics(tmp_path)] == [(1, "train"), (2, "train"), (2, "eval")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left
    assert rewind_metrics(path, 2) == 0
    assert rewind_metrics(tmp_path / "missing.jsonl", 2) == 0
    assert rewind_metrics(path, None) == 3 and path.read_text() == ""  # no checkpoint: the run starts over


def backdate_event_files(directory: Path) -> None:
    """Name the event files as if written a minute ago. TensorBoard reads a directory's files in name order,
    `events.out.tfevents.<seconds>.<host>.<pid>.<counter>`: two writers of one process in the same second would
    otherwise be ordered by a counter compared as text ("10" < "9"), never the case of a run and its resume."""
    for path in directory.glob("events.out.tfevents.*"):
        parts = path.name.split(".")
        parts[3] = "%010d" % (int(parts[3]) - 60)
        path.rename(path.with_name(".".join(parts)))


def test_resumed_run_logs_each_step_once_in_metrics_and_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf_ray.stages.common import MetricsLogger

    run = RunDir(str(tmp_path), "r")
    cfg = load_config(SFTConfig, None, SFT)
    assert run.prepare(cfg, "auto") is None
    logger = MetricsLogger(run.path)
    for step in (1, 2, 3, 4):  # the checkpoint is at step 2; the run dies after logging step 4
        logger.log(step, {"loss": 10.0 + step})
        if step == 2:
            save(run, 2)
    logger.close()
    backdate_event_files(run.path / "tensorboard")

    assert run.prepare(cfg, "auto") == run.checkpoint_path(2)
    assert "dropped 2 records logged after step 2" in capsys.readouterr().out
    logger = MetricsLogger(run.path)
    for step in (3, 4, 5):
        logger.log(step, {"loss": 20.0 + step})
    logger.close()

    assert [(m["step"], m["loss"]) for m in read_metrics(run.path)] == [(1, 11), (2, 12), (3, 23), (4, 24), (5, 25)]
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 11), (2, 12), (3, 23), (4, 24), (5, 25)]
