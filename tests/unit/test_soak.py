"""The pure parts of scripts/soak_rlhf.py: sample points, warm-up sample, growth, series, table, labels.

The script is imported by path; none of this starts Ray.
"""

from __future__ import annotations

import os

import pytest

from tests.scripts import script_module

MB = 2**20


@pytest.fixture(scope="module")
def soak():
    with script_module("soak_rlhf") as module:
        yield module


def test_sample_points_are_the_first_step_every_n_and_the_last(soak):
    assert soak.sample_points(1000, 50) == [1, *range(50, 1001, 50)]
    assert soak.sample_points(120, 50) == [1, 50, 100, 120]  # the last step even off the grid
    assert soak.sample_points(1, 50) == [1]
    with pytest.raises(ValueError, match="--every"):
        soak.sample_points(10, 0)


def test_warmup_index_is_the_first_sample_at_or_after_the_warmup(soak):
    points = [1, 50, 100, 150, 200]
    assert soak.warmup_index(points, 100) == 2
    assert soak.warmup_index(points, 101) == 3
    assert soak.warmup_index(points, 0) == 0
    assert soak.warmup_index(points, 999) == 4  # shorter run than the warm-up: the last sample (growth 0)


def test_growth_is_from_the_warmup_sample_to_the_last(soak):
    assert soak.growth_pct([100.0, 200.0, 210.0, 220.0], 1) == pytest.approx(10.0)
    assert soak.growth_pct([100.0, 200.0, 190.0], 1) == pytest.approx(-5.0)
    assert soak.growth_pct([100.0, 200.0, 220.0], 0) == pytest.approx(120.0)


def test_growth_is_none_when_a_sample_is_missing_or_zero(soak):
    assert soak.growth_pct([None, 100.0], 0) is None
    assert soak.growth_pct([100.0, None], 0) is None
    assert soak.growth_pct([0.0, 100.0], 0) is None
    assert soak.growth_pct([], 0) is None


def test_series_of_scales_and_fills_missing_groups(soak):
    samples = [{"step": 1, "groups": {"driver": {"rss": 100 * MB, "uss": 50 * MB, "n": 1.0}}},
               {"step": 50, "groups": {"driver": {"rss": 110 * MB, "uss": 55 * MB, "n": 1.0},
                                       "ray task workers": {"rss": 300 * MB, "uss": 200 * MB, "n": 2.0}}}]
    assert soak.series_of(samples, "rss") == {"driver": [100.0, 110.0], "ray task workers": [None, 300.0]}
    assert soak.series_of(samples, "uss")["driver"] == [50.0, 55.0]
    assert soak.series_of(samples, "n", scale=1.0)["ray task workers"] == [None, 2.0]


def test_table_rows_cells_growth_and_flag(soak):
    table = soak.format_table([1, 50, 100], {"generator[0]": [900.0, 1000.0, 1150.0], "driver": [500.0, 500.0, None],
                                             "reward[0]": [370.0, 373.0, 380.4]}, start=1)
    header, marker, gen, driver, reward = table.splitlines()
    assert header.split() == ["group", "1", "50", "100", "growth%"]
    assert marker.strip() == "^" and marker.index("^") == header.index("50") + 1  # under the warm-up column
    assert gen.split() == ["generator[0]", "900", "1000", "1150", "+15.0", ">"]  # above the 10% goal
    assert driver.split() == ["driver", "500", "500", "-", "-"]
    assert reward.split() == ["reward[0]", "370", "373", "380", "+2.0"]


def test_process_labels(soak):
    assert soak.process_label(["ray::IDLE"], "python") == "ray task workers"
    assert soak.process_label(["ray::make_experience"], "python") == "ray task workers"
    assert soak.process_label(["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--x=1"], "gcs_server") == "ray gcs_server"
    assert soak.process_label(["/venv/bin/python3.11", "-u", "/venv/lib/ray/_private/log_monitor.py", "--a"],
                              "python") == "ray log_monitor.py"
    assert soak.process_label([], "raylet") == "ray raylet"


def test_process_memory_measures_this_process_and_skips_dead_pids(soak):
    pytest.importorskip("psutil")
    mine = soak.process_memory([os.getpid()], descendants=False)
    assert mine["n"] == 1.0 and mine["rss"] >= mine["uss"] > 0
    gone = soak.process_memory([2**22 + 12345])  # above the default pid_max: never a live process
    assert gone == {"rss": 0.0, "uss": 0.0, "n": 0.0}
