"""Experiment trackers for a run's metrics: TensorBoard (the default), MLflow, Weights & Biases.

`run.loggers` names them; `MetricsLogger` (stages/common.py) always writes metrics.jsonl and hands each record's
finite numbers to every tracker here. MLflow and W&B are optional (`pip install 'rlhf_ray[trackers]'`): one that is
not installed, or that cannot start (e.g. W&B online without a login), is skipped with a one-line warning, and one
that fails while logging is dropped the same way; the run goes on either way.

- MLflow: the tracking URI is $MLFLOW_TRACKING_URI, else a file store in `<run dir>/mlruns` (browse it with
  `mlflow ui --backend-store-uri <run dir>/mlruns`); the experiment is $MLFLOW_EXPERIMENT_NAME or `rlhf_ray`, the run
  is named after the run directory, and the resolved config is logged as its parameters. Metric names are
  `<split>/<key>` with the key's slashes as dots (`train/reward.mean`, `eval/accuracy.sort`; see `mlflow_key`).
- W&B: offline unless $WANDB_MODE says otherwise (nothing leaves the machine; `wandb sync <run dir>/wandb/offline-run-*`
  uploads later); the project is $WANDB_PROJECT or `rlhf_ray`; files go to `<run dir>/wandb/`.

Resume: the MLflow run id and W&B run id are kept in `<run dir>/trackers.json`, so a resumed stage logs into the
same tracker run (one curve), never a second run. The steps between the last checkpoint and an interruption are
logged again: metrics.jsonl drops its records of them first (`RunDir.prepare`) and TensorBoard hides the old ones
(`purge_step`, the first step logged again); MLflow keeps both values of such a step, W&B the first.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from tqdm.auto import tqdm

from rlhf_ray.config_loader import flatten

TRACKER_NAMES = ("tensorboard", "mlflow", "wandb")
IDS_FILE = "trackers.json"
INSTALL_HINT = "pip install 'rlhf_ray[trackers]'"


class Tracker(Protocol):
    def log(self, step: int, prefix: str, values: dict[str, float]) -> None:
        """Record `values` (finite numbers) under `<prefix>/<key>` at `step`."""

    def close(self) -> None:
        """Flush and end the tracker's run (a resumed stage reopens it)."""


def warn(message: str) -> None:
    tqdm.write(f"[trackers] warning: {message}")


class TensorBoardTracker:
    """`<run dir>/tensorboard/` event files (what every stage wrote before trackers were configurable)."""

    def __init__(self, run_dir: Path, config: dict, ids: dict, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events of earlier files at this step and later (logged again now).
        self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, prefix: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self._writer.close()


# MLflow metric and parameter names: letters, digits, `_ - . / space` (a reward function's `module:function` has a
# colon, which older servers refuse).
_MLFLOW_BAD = re.compile(r"[^\w\-./ ]")


def mlflow_key(prefix: str, key: str) -> str:
    """`<prefix>/<key>` with the key's own slashes as dots: MLflow's file store keeps each metric in a file at that
    path, so `eval/accuracy` and `eval/accuracy/add` would need `accuracy` to be a file and a directory at once."""
    return f"{prefix}/{_MLFLOW_BAD.sub('_', key.replace('/', '.'))}"


def flat_params(config: dict) -> dict[str, str]:
    """A nested config as dotted keys -> string values (MLflow parameters)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(config).items()}


class MLflowTracker:
    """One MLflow run per run directory, through `MlflowClient` (no process-global active run, so the stages of a
    pipeline, one after the other in one process, each get their own)."""

    def __init__(self, run_dir: Path, config: dict, ids: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3.x keeps its file store in maintenance mode and refuses it unless opted in; the default here is
            # a store that needs no server and no database package, inside the run directory.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._resumed(ids.get("mlflow"))
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhf_ray")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [Param(_MLFLOW_BAD.sub("_", k)[:250], v[:6000]) for k, v in flat_params(config).items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 parameters per call
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        ids["mlflow"] = self.run_id

    def _resumed(self, run_id: Optional[str]) -> Optional[str]:
        """The stored run, set running again; None when there is none in this tracking store."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException:  # not in this store (another tracking URI than the first time): start a run here
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log(self, step: int, prefix: str, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(prefix, k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A W&B run, offline unless $WANDB_MODE says otherwise; resumed by id."""

    def __init__(self, run_dir: Path, config: dict, ids: dict):
        import wandb

        run_id = ids.get("wandb") or uuid.uuid4().hex[:8]  # W&B's own ids: 8 lowercase letters/digits
        # console off: W&B would otherwise wrap stdout/stderr (the progress bar's stream); no system-metrics sampler.
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf_ray"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"), settings=settings, reinit="create_new")
        ids["wandb"] = run_id

    def log(self, step: int, prefix: str, values: dict[str, float]) -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class TrackerSet:
    """The trackers of one run directory: opened together, each failure a warning that drops that tracker."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: dict, purge_step: Optional[int] = None):
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ValueError(f"run.loggers: unknown {unknown}; valid: {', '.join(TRACKER_NAMES)}")
        self._ids_path = run_dir / IDS_FILE
        ids = json.loads(self._ids_path.read_text()) if self._ids_path.is_file() else {}
        self.trackers: dict[str, Any] = {}
        for name in dict.fromkeys(names):  # each once, in the order given
            try:
                # Only TensorBoard can hide the steps that a resumed run logs again.
                extra = {"purge_step": purge_step} if name == "tensorboard" else {}
                self.trackers[name] = TRACKERS[name](run_dir, config, ids, **extra)
            except ImportError as err:
                warn(f"run.loggers names {name} but {_PACKAGES[name]} is not installed ({INSTALL_HINT}); "
                     f"skipping it ({err})")
            except Exception as err:  # the run matters more than one of its trackers
                warn(f"{name} could not start, skipping it: {type(err).__name__}: {err}")
        if ids:
            self._ids_path.write_text(json.dumps(ids, indent=2) + "\n")

    def log(self, step: int, prefix: str, values: dict[str, float]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(step, prefix, values)
            except Exception as err:
                warn(f"{name} failed to log step {step}, dropping it for the rest of the run: "
                     f"{type(err).__name__}: {err}")
                self.trackers.pop(name)

    def close(self) -> None:
        for name, tracker in self.trackers.items():
            try:
                tracker.close()
            except Exception as err:
                warn(f"{name} failed to close: {type(err).__name__}: {err}")
        self.trackers = {}
