"""The README's Python API example, run as written (on a tiny config of its own: data and output in tmp)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from rlhf_ray.data.synthetic import write_sft_dataset
from rlhf_ray.stages.common import read_metrics

REPO = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md: no ```python block in the Python API section"
    return match.group(1)


def test_the_readme_python_api_example_runs(ray_cluster, tmp_path, capsys):
    data = write_sft_dataset(tmp_path / "data", tasks=("reverse",), n_train=400, n_eval=16, seed=0)
    cfg = yaml.safe_load((REPO / "configs" / "tiny-cpu" / "sft.yaml").read_text())
    cfg["data"].update(train=str(data["train"]), eval=str(data["eval"]))
    cfg["learner"].update(num_ranks=1, zero_stage=0)
    cfg["run"]["output_dir"] = str(tmp_path / "runs")
    cfg["eval"].update(num_generate=8, num_print=0)
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(cfg))

    code = readme_example()
    assert "configs/tiny-cpu/sft.yaml" in code
    exec(compile(code.replace("configs/tiny-cpu/sft.yaml", str(config)), "README.md", "exec"), {})

    run_dir = tmp_path / "runs" / "sft-api"
    assert (run_dir / "model" / "config.json").is_file()
    train_steps = [m["step"] for m in read_metrics(run_dir) if m["split"] == "train"]
    assert max(train_steps) == 20  # the example's override reached the stage
    assert str(run_dir) in capsys.readouterr().out  # its print ran, with the result's run directory
