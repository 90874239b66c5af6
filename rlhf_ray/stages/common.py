"""What every stage's driver loop shares: run directory, metrics, checkpoints, data order, timing."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np
import yaml
from tqdm.auto import tqdm

from rlhf_ray.config.base import RunConfig
from rlhf_ray.config_loader import ConfigError, save_config
from rlhf_ray.distributed.worker_group import shard_rows
from rlhf_ray.utils.durable import fsync_dir, fsync_tree, rewind_metrics, write_json_durably

_CHECKPOINT = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
RESUME_FILE = "resume.json"        # what the latest start of the run resumed from: {"checkpoint", "step"}


class RunDir:
    """`<output_dir>/<name>/`: config.yaml, resume.json, metrics.jsonl, tensorboard/, checkpoints/, model/.

    Checkpoints survive a kill at any instant: the learners write into `checkpoints/step_N.tmp`, the driver adds
    trainer_state.json, fsyncs every file and directory of it, renames it `step_N` and fsyncs `checkpoints/`. A
    `step_N` without trainer_state.json is never listed; a `*.tmp` left by a kill is removed by the next `prepare`.
    """

    def __init__(self, output_dir: str, name: str):
        self.path = Path(output_dir) / name
        self.checkpoints = self.path / "checkpoints"
        self.model = self.path / "model"

    def prepare(self, cfg: Any, resume: str) -> Optional[Path]:
        """Create the directory and return the checkpoint to resume from, after checking that `cfg` may resume
        it (`resume_check`: same model, algorithm and data unless run.resume_override). Then remove staging
        dirs of checkpoints that were never committed, drop the metrics logged after the checkpoint (the run
        that stopped logged them; this one logs those steps again), and write the resolved config."""
        from rlhf_ray.stages.resume_check import check_resume_config

        checkpoint = self.find_resume_checkpoint(resume)
        if checkpoint is not None:
            check_resume_config(cfg, checkpoint, cfg.run.resume_override)  # before config.yaml is overwritten
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_stale_staging()
        step = read_trainer_state(checkpoint)["step"] if checkpoint is not None else None
        rewind_metrics(self.path / "metrics.jsonl", step)
        write_json_durably(self.path / RESUME_FILE, {"checkpoint": checkpoint and str(checkpoint), "step": step})
        save_config(cfg, self.path / "config.yaml")
        return checkpoint

    def list_checkpoints(self) -> list[Path]:
        """The complete checkpoints (`step_N` directories holding trainer_state.json), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir()
                      if _CHECKPOINT.match(p.name) and (p / STATE_FILE).is_file())

    def remove_stale_staging(self) -> None:
        """Remove the `*.tmp` directories of checkpoints whose writing was interrupted (never renamed final)."""
        if not self.checkpoints.is_dir():
            return
        stale = sorted(p for p in self.checkpoints.iterdir() if p.name.endswith(".tmp"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
            tqdm.write(f"[run] removed {path}: a checkpoint being written when an earlier run stopped"
                       + (" (could not remove all of it)" if path.exists() else ""))
        if stale:
            fsync_dir(self.checkpoints)

    def find_resume_checkpoint(self, resume: str) -> Optional[Path]:
        existing = self.list_checkpoints()
        if resume == "auto":
            return existing[-1] if existing else None
        if resume == "never":
            if existing:
                raise ConfigError(f"run.resume=never but {self.checkpoints} holds checkpoints "
                                  f"({existing[-1].name}); use run.resume=auto or another run.name")
            return None
        path = Path(resume)
        if path.name.endswith(".tmp"):  # complete-looking maybe, but never committed (and prepare removes it)
            raise ConfigError(f"run.resume: {path} is a checkpoint whose writing was interrupted; name a "
                              "checkpoints/step_N directory or use run.resume=auto")
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"run.resume: {path} is not a checkpoint directory (no {STATE_FILE})")
        return path

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def staging_path(self, step: int) -> Path:
        path = self.checkpoints / f"step_{step:08d}.tmp"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit_checkpoint(self, staging: Path, step: int, state: dict, keep: int) -> Path:
        """Write the driver's state into a fully written staging dir, make all of it durable, rename it final,
        prune old ones. A kill at any point leaves the previous checkpoints complete."""
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
        fsync_tree(staging)  # contents on disk before the rename makes them a checkpoint
        final = self.checkpoint_path(step)
        if final.exists():  # the same step again (a resume from an older checkpoint): set the old one aside
            self._discard(final)
        os.replace(staging, final)
        fsync_dir(self.checkpoints)  # the rename itself on disk
        for old in self.list_checkpoints()[:-keep]:
            self._discard(old)
        fsync_dir(self.checkpoints)
        return final

    def _discard(self, checkpoint: Path) -> None:
        # Renamed first (atomic), so that a kill while deleting leaves a *.tmp, never a part-deleted step_N that
        # still holds its trainer_state.json.
        aside = checkpoint.with_name(checkpoint.name + ".old.tmp")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
        shutil.rmtree(aside, ignore_errors=True)


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


class MetricsLogger:
    """Metrics to `metrics.jsonl` (one JSON object per record) and the experiment trackers of `run.loggers`
    (`rlhf_ray.trackers`: TensorBoard by default, MLflow, W&B).

    A resumed run's metrics.jsonl was rewound to the checkpoint's step by `RunDir.prepare`, and TensorBoard is
    told to hide its records after that step (`purge_step`), so each step appears once.

    `loggers` None: the `run.loggers` of the stage's resolved config, `<run_dir>/config.yaml` (written by
    `RunDir.prepare` before any logger exists); that config is also what MLflow and W&B record as the run's
    parameters. Without a config file: TensorBoard only.
    """

    def __init__(self, run_dir: Path, loggers: Optional[Sequence[str]] = None):
        from rlhf_ray.trackers import TrackerSet

        config_file = run_dir / "config.yaml"
        config = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}) if config_file.is_file() else {}
        if loggers is None:
            loggers = (config.get("run") or {}).get("loggers", RunConfig.loggers)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._trackers = TrackerSet(list(loggers), run_dir, config, purge_step=_purge_step(run_dir))

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        record = {"step": step, "split": prefix, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {key: float(value) for key, value in metrics.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        self._trackers.log(step, prefix, scalars)

    def close(self) -> None:
        self._file.close()
        self._trackers.close()


def _purge_step(run_dir: Path) -> Optional[int]:
    """The first step this start of the run logs again, from `RunDir.prepare`'s resume.json (None without
    one): TensorBoard hides what the run that stopped logged from there on, as `rewind_metrics` drops it."""
    resume_file = run_dir / RESUME_FILE
    if not resume_file.is_file():
        return None
    step = json.loads(resume_file.read_text()).get("step")
    return 0 if step is None else int(step) + 1


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class StepSampler:
    """Which rows each rank trains on at each step: a seeded permutation per epoch, drop-last.

    The data position is a pure function of the step number, so resuming needs only the step.
    """

    num_rows: int
    global_batch: int
    num_ranks: int
    seed: int

    def __post_init__(self):
        if self.num_rows < self.global_batch:
            raise ConfigError(f"the training set has {self.num_rows} rows, fewer than one global batch "
                              f"({self.global_batch} = num_ranks x micro_batch_size x grad_accum)")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    def shards(self, step: int) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        rows = order[index * self.global_batch:(index + 1) * self.global_batch].tolist()
        return shard_rows(rows, self.num_ranks)  # global_batch is a multiple of num_ranks: equal shards


def total_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    # Round before ceil: 1.1 * 100 is 110.00000000000001 in floating point, which is 110 steps, not 111.
    return max_steps if max_steps > 0 else max(1, int(math.ceil(round(epochs * steps_per_epoch, 6))))


@dataclass
class PhaseTimer:
    """Seconds spent in each named phase of a step."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds = {}
        return out


class StopRequest:
    """SIGINT handler for the step loop: the first Ctrl-C asks to stop at the next step boundary (the step in
    flight finishes, is logged and checkpointed); a second one interrupts at once, without a checkpoint.

    Stopping between steps is what makes a checkpoint resumable: a KeyboardInterrupt raised inside a step
    (e.g. from a blocking `ray.get`) leaves the learners finishing that step, so a checkpoint taken then would
    hold part of step N+1 under step N.
    """

    def __init__(self, name: str):
        self.name = name
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            tqdm.write(f"[{self.name}] second Ctrl-C: stopping now, without a checkpoint; run.resume=auto "
                       "continues from the last checkpoint written")
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"[{self.name}] Ctrl-C: the run stops after the current step (with a checkpoint); "
                   "press Ctrl-C again to stop at once without one")

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGINT with this object while inside; the previous handler is restored on exit. Signal
        handlers can only be set from the main thread: elsewhere nothing is installed (and no Ctrl-C reaches
        that thread anyway)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            # None: the previous handler was not set from Python and cannot be put back; use the default.
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class StageLoop(Protocol):
    """What `run_steps` drives: one stage's training loop, seen from the shared step schedule."""

    @property
    def name(self) -> str:
        """The stage's name: the progress bar's label and the Ctrl-C messages' prefix."""

    @property
    def total_steps(self) -> int:
        """The step the run ends at (steps are counted from 0; a resumed run starts part-way)."""

    @property
    def logger(self) -> MetricsLogger:
        """Where the train metrics of each logged step go."""

    def step(self, step: int) -> dict[str, Any]:
        """Train step `step` (0-based); returns its metrics."""

    def evaluate(self, step: int) -> dict[str, Any]:
        """Evaluate after `step` steps (logging it is the loop's job); returns the metrics."""

    def checkpoint(self, step: int) -> None:
        """Write a resumable checkpoint after `step` steps."""

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """A step's metrics as the progress bar's postfix (name -> formatted value)."""


def run_steps(loop: StageLoop, run: RunConfig, start: int) -> dict[str, Any]:
    """The step loop every stage shares: train steps `start..loop.total_steps` with a progress bar; log,
    evaluate and checkpoint on `run`'s schedule; at the end checkpoint and return the final eval.

    Ctrl-C (see `StopRequest`): the step in flight completes, is logged and checkpointed at the step boundary,
    then KeyboardInterrupt is raised; `run.resume=auto` continues the same curve. A second Ctrl-C stops at once.
    """
    name, steps = loop.name, loop.total_steps
    current, saved = start, None
    stop = StopRequest(name)
    bar = tqdm(total=steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
    try:
        with stop.installed():
            while current < steps and not stop.requested:
                metrics = loop.step(current)
                current += 1
                bar.update(1)
                bar.set_postfix(**loop.postfix(metrics))
                if current % run.log_every == 0 or current == steps or stop.requested:
                    loop.logger.log(current, metrics)
                if stop.requested:
                    break
                if run.eval_every and current % run.eval_every == 0 and current < steps:
                    loop.evaluate(current)
                if run.save_every and current % run.save_every == 0 and current < steps:
                    loop.checkpoint(current)
                    saved = current
            if saved != current:
                loop.checkpoint(current)
    finally:
        bar.close()
    if stop.requested:
        tqdm.write(f"[{name}] stopped by Ctrl-C after step {current} (checkpointed); run.resume=auto continues")
        raise KeyboardInterrupt
    return loop.evaluate(current)
