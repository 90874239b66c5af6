"""The shared step loop's Ctrl-C handling, with real SIGINTs sent to this process in the middle of a step."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace

import pytest

from rlhf_ray.config import RunConfig
from rlhf_ray.stages.common import MetricsLogger, read_metrics, run_steps


class Trainer:
    """A stand-in for a stage loop (a `StageLoop`): `state` is the number of updates applied. `interrupt_at`
    maps a step index to how many SIGINTs arrive while that step is half done (after the update began, before
    the step returns its metrics)."""

    name = "test"

    def __init__(self, interrupt_at: dict[int, int]):
        self.state, self.interrupt_at = 0, interrupt_at
        self.total_steps = 0
        self.logger: MetricsLogger
        self.checkpoints: dict[int, int] = {}  # step -> state saved under it
        self.evaluated: list[int] = []

    def step(self, index: int) -> dict[str, float]:
        self.state += 1  # the update is applied ...
        for _ in range(self.interrupt_at.get(index, 0)):
            os.kill(os.getpid(), signal.SIGINT)  # ... Ctrl-C arrives ...
        return {"loss": 1.0 / self.state}       # ... and the step still has work to finish

    def evaluate(self, step: int) -> dict[str, float]:
        self.evaluated.append(step)
        return {"step": float(step)}

    def checkpoint(self, step: int) -> None:
        self.checkpoints[step] = self.state

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.3f}"}


def run(trainer: Trainer, tmp_path, steps: int = 8, **run_options) -> dict:
    cfg = replace(RunConfig(), **{"log_every": 100, "save_every": 0, "eval_every": 0, **run_options})
    trainer.total_steps, trainer.logger = steps, MetricsLogger(tmp_path)
    try:
        return run_steps(trainer, cfg, 0)
    finally:
        trainer.logger.close()


def logged_steps(tmp_path) -> list[int]:
    return [m["step"] for m in read_metrics(tmp_path) if m["split"] == "train"]


def test_ctrl_c_mid_step_checkpoints_the_completed_step(tmp_path):
    trainer = Trainer({2: 1})  # interrupted during the third step (index 2)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run(trainer, tmp_path, save_every=2)
    # Step 3 completed and was saved at the step boundary, holding exactly 3 updates; nothing ran after it.
    assert trainer.checkpoints == {2: 2, 3: 3}
    assert trainer.state == 3
    assert logged_steps(tmp_path) == [3]  # logged although log_every is 100
    assert trainer.evaluated == []        # no final evaluation of an interrupted run
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_in_the_last_step_still_stops(tmp_path):
    trainer = Trainer({3: 1})
    with pytest.raises(KeyboardInterrupt):
        run(trainer, tmp_path, steps=4)
    assert trainer.checkpoints == {4: 4} and trainer.evaluated == []


def test_second_ctrl_c_stops_at_once_without_checkpoint(tmp_path, capsys):
    trainer = Trainer({1: 2})
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run(trainer, tmp_path)
    assert trainer.checkpoints == {}
    assert logged_steps(tmp_path) == []
    assert "second Ctrl-C: stopping now, without a checkpoint" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before


def test_uninterrupted_run_and_handler_restored(tmp_path):
    trainer = Trainer({})
    before = signal.getsignal(signal.SIGINT)
    assert run(trainer, tmp_path, steps=5, log_every=2) == {"step": 5.0}
    assert trainer.checkpoints == {5: 5} and trainer.evaluated == [5]
    assert logged_steps(tmp_path) == [2, 4, 5]
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_no_handler_is_installed(tmp_path):
    trainer, errors = Trainer({}), []
    before = signal.getsignal(signal.SIGINT)

    def target():
        try:
            run(trainer, tmp_path, steps=3)
        except ValueError as exc:  # what signal.signal raises outside the main thread
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    assert errors == [] and trainer.checkpoints == {3: 3}
    assert signal.getsignal(signal.SIGINT) is before
