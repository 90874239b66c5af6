"""`run.log_level`: what each level sets in the actors' environment and the driver, and the log filters
(each vLLM warning once; the tied-head reload warning dropped). The runs themselves: tests/ray/test_quiet.py."""

from __future__ import annotations

import logging

import pytest

from rlhf_ray.config import RunConfig
from rlhf_ray.config_loader import ConfigError, load_config
from rlhf_ray.utils.logs import (
    LOG_LEVEL_ENV,
    OncePerMessage,
    actor_runtime_env,
    current_log_level,
    dropping,
    log_level_scope,
    worker_log_env,
)


def test_run_log_level_defaults_to_info_and_takes_only_info_or_debug():
    assert RunConfig().log_level == "info"
    assert load_config(RunConfig, None, ["log_level=debug"]).log_level == "debug"
    with pytest.raises(ConfigError, match="log_level: expected one of 'info', 'debug', got 'verbose'"):
        load_config(RunConfig, None, ["log_level=verbose"])


def test_info_quiets_vllm_and_the_workers_warnings_and_debug_restores_them():
    info, debug = worker_log_env("info"), worker_log_env("debug")
    assert info["VLLM_LOGGING_LEVEL"] == "WARNING" and debug["VLLM_LOGGING_LEVEL"] == "INFO"
    assert "ignore::DeprecationWarning" in info["PYTHONWARNINGS"] and debug["PYTHONWARNINGS"] == "default"
    assert debug["TRANSFORMERS_VERBOSITY"] == "info"
    assert (info[LOG_LEVEL_ENV], debug[LOG_LEVEL_ENV]) == ("info", "debug")
    with pytest.raises(ValueError, match="run.log_level: expected one of info, debug, got 'loud'"):
        worker_log_env("loud")


def test_actor_env_adds_the_level_and_the_caller_s_variables_win():
    env = actor_runtime_env({"env_vars": {"VLLM_LOGGING_LEVEL": "DEBUG", "A": "1"}, "pip": ["x"]}, "info")
    assert env["env_vars"]["VLLM_LOGGING_LEVEL"] == "DEBUG"  # e.g. from generator.env_vars
    assert env["env_vars"]["A"] == "1" and env["pip"] == ["x"]
    assert env["env_vars"]["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    assert actor_runtime_env(None, "debug")["env_vars"][LOG_LEVEL_ENV] == "debug"


def test_the_scope_sets_the_level_for_actors_and_ray_s_driver_logger(monkeypatch):
    import ray  # noqa: F401  (importing Ray sets its logger's level: compare with that)

    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)
    ray_logger = logging.getLogger("ray")
    before = ray_logger.level
    assert current_log_level() == "info"
    with log_level_scope("debug"):
        assert current_log_level() == "debug"
        assert actor_runtime_env(None)["env_vars"]["VLLM_LOGGING_LEVEL"] == "INFO"
        assert ray_logger.level == logging.INFO
    with log_level_scope("info"):
        assert ray_logger.level == logging.WARNING
    assert current_log_level() == "info" and ray_logger.level == before
    # Inside an actor there is no scope: the level comes from the environment its runtime_env set.
    monkeypatch.setenv(LOG_LEVEL_ENV, "debug")
    assert current_log_level() == "debug"


def _capture(name: str) -> tuple[logging.Logger, list[str]]:
    logger, seen = logging.getLogger(name), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger, seen


def test_each_distinct_warning_passes_once_per_process_even_through_new_handlers():
    logger, seen = _capture("fake_vllm")
    logger.handlers[0].addFilter(OncePerMessage())
    child = logging.getLogger("fake_vllm.worker")
    for _ in range(3):
        child.warning("skip %s", "set_num_threads")
        child.info("step")
    child.warning("skip %s", "other")
    assert seen == ["skip set_num_threads", "step", "step", "step", "skip other"]
    # vLLM applies its logging config again when an engine starts: a new handler with a new filter.
    logger.handlers[0].filters, replaced = [], logging.Handler()
    replaced.emit = lambda record: seen.append(record.getMessage())
    replaced.addFilter(OncePerMessage())
    logger.handlers = [replaced]
    child.warning("skip %s", "set_num_threads")
    child.warning("skip %s", "new")
    assert seen[-2:] == ["skip other", "skip new"]


def test_dropping_removes_only_the_matching_records_and_only_inside_the_block():
    logger, seen = _capture("fake_vllm_layerwise")
    with dropping("fake_vllm_layerwise", lambda r: r.getMessage() == "ParallelLMHead: Failed to load weights"):
        logger.warning("%s: Failed to load weights", "ParallelLMHead")
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")
    logger.warning("%s: Failed to load weights", "ParallelLMHead")
    assert seen == ["QKVParallelLinear: Failed to load weights", "ParallelLMHead: Failed to load weights"]
    assert not logger.filters
