"""The run report on fake but realistic run directories: metrics.jsonl written by the stages' own MetricsLogger
(train and eval rows, the keys each stage logs), rollouts written by the RLHF loop's own `write_rollouts`.
Checked: the files written, every PNG decodes, the page names every plot and escapes text, the monitors show,
the pipeline's before/after table is there, and `rlhf-ray report` runs and fails with a located message."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest

from rlhf_ray.cli import main
from rlhf_ray.report.build import default_out_dir, detect_stage, read_rows, write_report
from rlhf_ray.rollout.experience import write_rollouts
from rlhf_ray.stages.common import MetricsLogger

HOSTILE = '<script>alert("x")</script> & <b>'  # a prompt that must show as text, never as markup


def _log(run_dir: Path, train, evals) -> Path:
    """Write metrics.jsonl with MetricsLogger: `train(step)` every 5 steps to 60, `evals(step)` every 20."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(run_dir)
    try:
        logger.log(0, evals(0), prefix="eval")
        for step in range(5, 61, 5):
            logger.log(step, train(step))
            if step % 20 == 0:
                logger.log(step, evals(step), prefix="eval")
    finally:
        logger.close()
    return run_dir


def fake_sft(run_dir: Path) -> Path:
    return _log(run_dir,
                lambda s: {"loss": 3.0 * math.exp(-s / 20), "lr": 1e-3, "grad_norm": 1.5, "step_time": 0.1,
                           "tokens_per_s": 9000.0, "epoch": s / 100},
                lambda s: {"loss": 3.2 * math.exp(-s / 25), "accuracy": s / 120, "score": s / 100,
                           "accuracy/sort": s / 100, "accuracy/reverse": s / 80})


def fake_rlhf(run_dir: Path, hacked: bool = False) -> Path:
    """An RLHF run; `hacked`: length and reward-model reward climb while the checker's score stays put."""
    def train(s: int) -> dict:
        return {"reward/mean": 0.5 + s / 300, "reward/std": 0.3, "reward/reward_model": 1.0 + s / 60,
                "reward/task_score": 0.4 + (0 if hacked else s / 300), "kl": 0.02 * s,
                "response_length": 5 + (s / 5 if hacked else 0.1 * (s % 2)), "truncated_fraction": 0.0,
                "logprob_gap/mean": 2e-7, "logprob_gap/max": 6e-6, "policy/loss": -0.01, "value_loss": 1 / (1 + s),
                "time/generate": 0.13, "time/score": 0.22, "time/train": 0.49, "time/sync": 0.05, "step_time": 0.9,
                "kl_coef": 0.01}

    def evals(s: int) -> dict:
        return {"reward": 0.6 + s / 300, "kl": 0.02 * s, "response_length": 5.0 + (s / 5 if hacked else 0),
                "accuracy": 0.5 if hacked else 0.5 + s / 200, "task_score": 0.7 if hacked else 0.7 + s / 300}

    _log(run_dir, train, evals)
    responses = ["abc", HOSTILE, "cba", "ab\nc"]
    rollouts = pa.table({"prompt_text": [HOSTILE, "sort\ncab", "reverse\nabc", "sort\nbca"],
                         "response_text": responses, "finish_reason": ["stop", "length", "stop", "stop"],
                         "metadata": [json.dumps({"task": "sort", "reference": "abc"})] * 4})
    experience = pa.table({"score": pa.array([1.0, 0.0, 0.5, 0.25], pa.float32()),
                           "response_ids": [[1] * len(r) for r in responses]})
    for step in (30, 60):  # run.save_rollouts_every=30: the report shows the last file's rows
        write_rollouts(run_dir / "rollouts" / f"step_{step:08d}.parquet", rollouts, experience,
                       [[0.1, 0.2]] * 4)
    return run_dir


def decoded_pngs(out: Path) -> list[Path]:
    from matplotlib.image import imread

    pngs = sorted((out / "plots").glob("*.png"))
    for png in pngs:
        pixels = imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, png
        assert pixels.std() > 0, f"{png} is blank"
    return pngs


def test_an_rlhf_run_gets_every_panel_samples_and_no_warning(tmp_path):
    run = fake_rlhf(tmp_path / "runs" / "demo-rlhf")
    page = write_report([run])
    assert page == run / "report" / "report.html"
    names = {p.stem.removeprefix("0-demo-rlhf-") for p in decoded_pngs(page.parent)}
    assert names == {"loss", "reward", "kl", "response_length", "accuracy", "logprob_gap", "phase_times",
                     "reward_vs_kl", "eval"}
    text = page.read_text()
    for png in (page.parent / "plots").glob("*.png"):
        assert f'src="plots/{png.name}"' in text
    assert "No reward-hacking monitor tripped" in text
    assert "step_00000060.parquet" in text and "step_00000030.parquet" not in text
    assert "<th>reference</th>" in text  # from the rows' metadata
    assert HOSTILE not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in text
    assert "<script" not in text


def test_monitors_show_in_the_report(tmp_path):
    page = write_report([fake_rlhf(tmp_path / "hacked-rlhf", hacked=True)])
    text = page.read_text()
    assert "[monitor] length_drift" in text and "[monitor] reward_without_task" in text
    assert "No reward-hacking monitor tripped" not in text


def test_a_pipeline_report_has_the_before_after_table_and_every_stage(tmp_path):
    runs = [fake_sft(tmp_path / "demo-sft"), fake_rlhf(tmp_path / "demo-rlhf")]
    assert [detect_stage(read_rows(r), r) for r in runs] == ["sft", "rlhf"]
    page = write_report(runs)
    assert page == tmp_path / "demo-report" / "report.html"
    text = page.read_text()
    assert "Before / after" in text and "task_score" in text and "RLHF" in text
    plots = decoded_pngs(page.parent)
    assert any(p.name.startswith("0-demo-sft-loss") for p in plots)
    assert any(p.name.startswith("1-demo-rlhf-reward") for p in plots)


def test_runs_of_one_stage_are_also_overlaid(tmp_path):
    runs = [fake_rlhf(tmp_path / "a"), fake_rlhf(tmp_path / "b", hacked=True)]
    page = write_report(runs, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "plots" / "compare-rlhf-response_length.png").is_file()
    assert "Compared: rlhf runs" in page.read_text()
    assert default_out_dir(runs) == tmp_path / "report"  # no common name prefix


def test_where_a_report_goes_by_default():
    demo = [Path("runs") / f"demo-{stage}-20261203-1642" for stage in ("sft", "rm", "rlhf")]
    assert default_out_dir(demo) == Path("runs/demo-report-20261203-1642")  # make demo's names: one per demo
    assert default_out_dir([Path("runs/q-sft"), Path("runs/q-rlhf")]) == Path("runs/q-report")
    assert default_out_dir([Path("runs/q-sft")]) == Path("runs/q-sft/report")


def test_cli_writes_the_report(tmp_path, capsys):
    run = fake_sft(tmp_path / "sft-run")
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    assert f"[report] {tmp_path / 'out' / 'report.html'}" in capsys.readouterr().out
    assert decoded_pngs(tmp_path / "out")


@pytest.mark.parametrize("damage", ["missing", "bad_line"])
def test_cli_names_the_bad_run_dir(tmp_path, capsys, damage):
    run = fake_sft(tmp_path / "sft-run")
    if damage == "missing":
        run = tmp_path / "nothing-here"
    else:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        lines.insert(2, "{not json")
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "rlhf-ray report: error:" in err
    assert ("no metrics.jsonl" in err) if damage == "missing" else ("metrics.jsonl line 3: not JSON" in err)
