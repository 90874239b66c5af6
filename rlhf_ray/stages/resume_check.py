"""Refuse to resume a checkpoint under a config that changes what the checkpoint means.

A checkpoint is the state of one training run: its weights came from one model, were optimised for one
objective on one data set, and its step counter indexes that data's order. Resuming it with another model,
objective or data would continue a curve that is no longer the same experiment, silently. So when a stage
resumes, `RunDir.prepare` compares the new config with the `config.yaml` of the checkpoint's run directory
(read before it is overwritten) on the keys of `RESUME_LOCKED_KEYS`, and refuses a change with a `ConfigError`
listing every differing key as `old -> new`, unless `run.resume_override=true`, which proceeds and prints them.

Every other key may change between the two runs: the schedule (run.max_steps, run.epochs, log_every, eval_every,
save_every), the place and size of the cluster (ray_address, num_cpus, placement), evaluation, trackers, names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from tqdm.auto import tqdm

from rlhf_ray.config_loader import ConfigError, flatten, to_dict

# The keys a resumed run must share with the run that wrote its checkpoint, by why. A prefix covers every key
# under it (`algorithm` is the whole section). A stage compares only the keys its config has: SFT has no `loss`,
# RLHF has `policy` instead of `model`.
RESUME_LOCKED_KEYS: dict[str, tuple[str, ...]] = {
    # The weights: what the checkpoint's parameters started from (and the models its objective reads), and the
    # tokenizer that turns text into the token ids those parameters were trained on.
    "model": ("model.path", "model.tokenizer", "policy.path", "policy.tokenizer", "reference.path",
              "reward.model", "critic.path"),
    # The objective: RLHF's algorithm section (estimator, losses, KL), the reward model's and DPO's loss section.
    "algorithm": ("algorithm", "loss"),
    # The data: the files, and the split that decides which rows are trained on (the data position of a
    # checkpoint is a step number into that order).
    "data": ("data.train", "data.eval", "data.split", "data.eval_fraction"),
}


def is_locked(key: str) -> bool:
    """Whether dotted `key` is one a resumed run must keep (`RESUME_LOCKED_KEYS`)."""
    return any(key == p or key.startswith(p + ".") for group in RESUME_LOCKED_KEYS.values() for p in group)


def locked_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every locked key whose value differs between two config dicts.

    A key present in only one of them is not compared: it is a field added or removed by another version of
    rlhf_ray, not a choice of the user (the old run ran with that version's behaviour).
    """
    before, after = flatten(old), flatten(new)
    return [(key, before[key], after[key]) for key in sorted(before.keys() & after.keys())
            if is_locked(key) and before[key] != after[key]]


def describe(differences: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {key}: {_show(a)} -> {_show(b)}" for key, a, b in differences)


def _show(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def check_resume_config(cfg: Any, checkpoint: Path, override: bool,
                        quiet: bool = False) -> Optional[list[tuple[str, Any, Any]]]:
    """Compare `cfg` with the config.yaml of `checkpoint`'s run directory (`<run>/checkpoints/step_N`).

    Returns the locked differences (empty: none; None: that run has no config.yaml to compare with). Raises
    ConfigError listing them unless `override`, in which case they are printed and the resume goes on.
    `quiet`: print nothing (an early check; `RunDir.prepare` checks again and says it then).
    """
    old_file = checkpoint.parent.parent / "config.yaml"
    if not old_file.is_file():
        if not quiet:
            tqdm.write(f"[resume] {old_file} is missing: the config of the run that wrote {checkpoint} is not "
                       "compared")
        return None
    old = yaml.safe_load(old_file.read_text(encoding="utf-8")) or {}
    # Through YAML as config.yaml is written, so that the two sides have the same types (lists, floats).
    new = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False)) or {}
    differences = locked_differences(old, new)
    if differences and not override:
        raise ConfigError(
            f"run.resume: {checkpoint} was written by a run whose model, algorithm or data differ from this "
            f"config's ({old_file} -> this config):\n{describe(differences)}\nResuming would continue that run's "
            "state under another experiment. Set run.resume_override=true to resume anyway, or give this "
            "config another run.name to start a new run.")
    if differences and not quiet:
        tqdm.write(f"[resume] run.resume_override=true: resuming {checkpoint} although these keys differ from "
                   f"{old_file}:\n{describe(differences)}")
    return differences
