"""`run.loggers`: metrics.jsonl plus TensorBoard (default), MLflow (file store in the run directory) and W&B (offline),
read back with each tool's own reader; a resumed run logs into the same tracker run; a missing package is skipped
with a warning. MLflow and W&B are the optional `trackers` extra: their tests skip when it is not installed."""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import RunConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.stages.common import MetricsLogger, read_metrics
from rlhf_ray.trackers import IDS_FILE, TRACKERS, TrackerSet


def log_run(run_dir: Path, steps: range, loggers=None) -> None:
    logger = MetricsLogger(run_dir, loggers)
    for step in steps:
        logger.log(step, {"loss": 1.0 / step, "reward/mean": float(step), "score/pkg.mod:fn": 0.5,
                          "note": "text", "nan": float("nan")})
    logger.log(steps[-1], {"accuracy": 0.75, "accuracy/sort": 0.5}, prefix="eval")
    logger.close()


def test_default_is_tensorboard_only(tmp_path):
    log_run(tmp_path, range(1, 3))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "wandb").exists()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 2]
    assert RunConfig().loggers == ("tensorboard",)


def test_loggers_come_from_the_run_directorys_config(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "r", "loggers": []}}))
    log_run(tmp_path, range(1, 2))
    assert not (tmp_path / "tensorboard").exists()  # [] : metrics.jsonl only
    assert len(read_metrics(tmp_path)) == 2


def test_config_key_rejects_unknown_trackers():
    assert load_config(RunConfig, None, ["loggers=[tensorboard,mlflow,wandb]"]).loggers == \
        ("tensorboard", "mlflow", "wandb")
    with pytest.raises(ConfigError, match="loggers"):
        load_config(RunConfig, None, ["loggers=[comet]"])


def test_missing_package_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    log_run(tmp_path, range(1, 3), loggers=["wandb", "tensorboard"])
    err = capsys.readouterr()
    lines = [line for line in (err.out + err.err).splitlines() if "[trackers]" in line]
    assert len(lines) == 1 and "wandb is not installed" in lines[0] and "rlhf_ray[trackers]" in lines[0]
    assert len(read_metrics(tmp_path)) == 3 and (tmp_path / "tensorboard").is_dir()


def test_a_tracker_that_fails_while_logging_is_dropped(tmp_path, monkeypatch, capsys):
    class Broken:
        def __init__(self, run_dir, config, ids):
            self.calls = 0

        def log(self, step, prefix, values):
            raise RuntimeError("server gone")

        def close(self):
            raise AssertionError("a dropped tracker is not closed")

    monkeypatch.setitem(TRACKERS, "mlflow", Broken)
    trackers = TrackerSet(["mlflow"], tmp_path, {})
    trackers.log(1, "train", {"loss": 1.0})
    trackers.log(2, "train", {"loss": 1.0})
    trackers.close()
    out = capsys.readouterr()
    assert (out.out + out.err).count("server gone") == 1


# -- MLflow ---------------------------------------------------------------------------------------------------------
def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def test_mlflow_file_store_in_the_run_directory_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets for its default store
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "r", "loggers": ["mlflow"]},
                                                          "learner": {"lr": 0.001}}))
    log_run(tmp_path, range(1, 4))
    run_id = json.loads((tmp_path / IDS_FILE).read_text())["mlflow"]
    uri = (tmp_path / "mlruns").resolve().as_uri()
    assert mlflow_history(uri, run_id, "train/loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    # a metric and one named under it (accuracy, accuracy/sort) both fit in the file store
    assert mlflow_history(uri, run_id, "eval/accuracy") == [(3, 0.75)]
    assert mlflow_history(uri, run_id, "eval/accuracy.sort") == [(3, 0.5)]
    assert mlflow_history(uri, run_id, "train/score.pkg.mod_fn") == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert mlflow_history(uri, run_id, "train/nan") == []  # non-finite values stay in metrics.jsonl only
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params["learner.lr"] == "0.001" and run.info.status == "FINISHED"

    log_run(tmp_path, range(4, 6))  # resumed: the same MLflow run continues
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rlhf_ray")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert [s for s, _ in mlflow_history(uri, run_id, "train/loss")] == [1, 2, 3, 4, 5]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_mlflow_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.resolve().as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log_run(run_dir, range(1, 2), loggers=["mlflow"])
    run_id = json.loads((run_dir / IDS_FILE).read_text())["mlflow"]
    assert not (run_dir / "mlruns").exists()
    assert mlflow_history(store.resolve().as_uri(), run_id, "train/reward.mean") == [(1, 1.0)]


# -- W&B ------------------------------------------------------------------------------------------------------------
def wandb_history(path: str) -> list[dict]:
    """History rows of an offline run's `.wandb` file: a LevelDB-style log (32 KiB blocks, records with a 7-byte
    header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after a 7-byte W&B file header, each record a
    `wandb_internal.Record` protobuf (W&B 0.31 ships no Python reader for it)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunk, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_history_and_resume(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log_run(run_dir, range(1, 3), loggers=["wandb"])
    wandb.teardown()  # run.finish() returns before W&B's service has written the last records; this waits for it
    run_id = json.loads((run_dir / IDS_FILE).read_text())["wandb"]
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
    assert len(files) == 1
    rows = wandb_history(files[0])
    assert [(r["_step"], r.get("train/loss")) for r in rows] == [(1, 1), (2, 0.5)]
    assert rows[-1]["eval/accuracy"] == 0.75 and rows[-1]["eval/accuracy/sort"] == 0.5
    assert rows[-1]["train/reward/mean"] == 2 and "train/nan" not in rows[-1]

    log_run(run_dir, range(3, 4), loggers=["wandb"])  # resumed: the same W&B run id, a second offline segment
    wandb.teardown()
    assert json.loads((run_dir / IDS_FILE).read_text())["wandb"] == run_id
    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
    assert len(files) == 2
    assert [r["_step"] for f in files for r in wandb_history(f)] == [1, 2, 3]
