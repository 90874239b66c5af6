"""`rlhf-ray report RUN_DIR [RUN_DIR ...]`: report.html plus PNG plots for one or more run directories.

Each run gets a section: its final held-out metrics, the reward-hacking monitors' verdict, one plot per panel
(loss, reward and its components, KL, response length, accuracy / task score, logprob gap, phase times), the
reward-vs-KL frontier, every eval curve, and (RLHF) sample answers from its last saved rollouts. Several runs
of the same stage (runs to compare) also get overlaid plots. When the runs are a pipeline's stages (SFT then
RLHF or DPO), the page starts with the pipeline's before/after table.

Where it goes (`default_out_dir`): one run: `<run>/report/`; several: next to the first, in
`<parent>/<common name prefix>-report-<common name suffix>/` (`make demo`'s `demo-sft-<tag>`, `demo-rm-<tag>`,
`demo-rlhf-<tag>` -> `demo-report-<tag>/`; `a-sft`, `a-rlhf` -> `a-report/`), `<parent>/report/` when the
names share neither.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

from rlhf_ray.config_loader import ConfigError
from rlhf_ray.report import html
from rlhf_ray.report.monitors import check
from rlhf_ray.report.plots import PANELS, eval_grid, frontier_plot, panel_plot, safe_name

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
SAMPLE_ROWS = 12
"""Sample answers shown per RLHF run (the first rows of its last rollouts file: a few prompts' groups)."""


@dataclass
class RunData:
    """One run directory as the report reads it."""

    path: Path
    rows: list[dict]
    stage: str
    samples_file: Optional[Path] = None
    samples: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.name


def read_rows(path: Path) -> list[dict]:
    """The rows of `<run>/metrics.jsonl`; a bad line is an error naming the file and line."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{path}: no metrics.jsonl; give a run directory (e.g. runs/<name>) of sft, rm, dpo "
                          "or rlhf")
    rows, lines = [], metrics.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            # A run killed mid-write can leave a partial last line: skip it, anything else is damage.
            if number == len(lines):
                continue
            raise ConfigError(f"{metrics} line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "step" not in row or "split" not in row:
            raise ConfigError(f"{metrics} line {number}: expected an object with step and split")
        rows.append(row)
    return rows


def detect_stage(rows: Sequence[dict], path: Path) -> str:
    """sft, rm, dpo or rlhf, from what the run logged (the metrics are each stage's own)."""
    keys = {k for row in rows for k in row}
    if (path / "rollouts").is_dir() or any(k.startswith("reward/") for k in keys):
        return "rlhf"
    if keys & {"preference_accuracy", "reward_margin", "logp_accuracy"}:
        return "dpo"
    if keys & {"reward_mean", "margin"}:
        return "rm"
    return "sft"


def read_samples(path: Path) -> tuple[Optional[Path], list[dict]]:
    """The last rollouts file of an RLHF run (`rollouts/step_*.parquet`, run.save_rollouts_every) and its
    first SAMPLE_ROWS rows; (None, []) when the run saved none."""
    files = sorted((path / "rollouts").glob("step_*.parquet")) if (path / "rollouts").is_dir() else []
    if not files:
        return None, []
    import pyarrow.parquet as pq

    rows = pq.read_table(files[-1]).slice(0, SAMPLE_ROWS).to_pylist()
    for row in rows:  # the task's reference answer (synthetic and checker-graded data carry one), beside the answer
        try:
            meta = json.loads(row.get("metadata") or "{}")
        except json.JSONDecodeError:
            meta = {}
        row["reference"] = meta.get("reference", "") if isinstance(meta, dict) else ""
    return files[-1], rows


def load_run(path: Path) -> RunData:
    path = Path(path)
    rows = read_rows(path)
    run = RunData(path, rows, detect_stage(rows, path))
    if run.stage == "rlhf":
        run.samples_file, run.samples = read_samples(path)
    return run


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """See the module docstring."""
    paths = [Path(p) for p in run_dirs]
    if len(paths) == 1:
        return paths[0] / "report"
    names = [p.name for p in paths]
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[len(prefix):][::-1] for n in names])[::-1]  # after the prefix: no overlap
    prefix, suffix = prefix.rstrip("-_."), suffix.lstrip("-_.")
    return paths[0].parent / "-".join(part for part in (prefix, "report", suffix) if part)


def pipeline_table(runs: Sequence[RunData]) -> Optional[str]:
    """The pipeline's before/after table (`stages.pipeline.before_after_table`) when the runs are a pipeline's
    stages: one SFT run and one final stage (RLHF or DPO) with evaluations; None otherwise (e.g. runs to compare)."""
    counts = {stage: sum(run.stage == stage for run in runs) for stage in ("sft", "rm", "dpo", "rlhf")}
    finals = [s for s in ("dpo", "rlhf") if counts[s]]
    if counts["sft"] != 1 or len(finals) != 1 or counts[finals[0]] != 1 or counts["rm"] > 1:
        return None
    final = finals[0]
    stages = {run.stage: SimpleNamespace(run_dir=run.path) for run in runs}
    if not any(r["split"] == "eval" for r in read_rows(stages[final].run_dir)):
        return None
    from rlhf_ray.stages.pipeline import before_after_table  # imports the stages (Ray, torch): only here

    return before_after_table({k: v for k, v in stages.items() if k in (final, "rm")})


def _final_eval(run: RunData) -> str:
    evals = [r for r in run.rows if r["split"] == "eval"]
    if not evals:
        return '<p class="muted">No evaluation logged.</p>'
    first, last = evals[0], evals[-1]
    keys = [k for k, v in last.items() if k not in ("step", "split", "time") and isinstance(v, (int, float))]
    rows = [(k, first.get(k, float("nan")), last[k]) for k in keys]
    return html.table(["held-out metric", f"step {first['step']}", f"step {last['step']}"], rows)


def _samples(run: RunData, out_dir: Path) -> str:
    if not run.samples:
        return ""
    source = os.path.relpath(run.samples_file, out_dir)
    cols = [c for c in ("prompt", "response", "reference", "score", "kl", "length", "finish_reason")
            if c in run.samples[0]]
    body = html.table(cols, [[row[c] for c in cols] for row in run.samples],
                      text_columns=[i for i, c in enumerate(cols) if c in ("prompt", "response", "reference")])
    return f"<h3>Sample answers</h3><p class=\"muted\">First {len(run.samples)} rows of {html.esc(source)}</p>{body}"


def _plots(runs: Sequence[RunData], out_dir: Path, stem: str) -> list[str]:
    """Every panel for `runs` (overlaid when several), as <img> tags; panels without data are left out."""
    pairs = [(run.label, run.rows) for run in runs]
    made = [panel_plot(pairs, panel, out_dir / PLOTS_DIR / f"{stem}-{panel.name}.png") for panel in PANELS]
    made.append(frontier_plot(pairs, out_dir / PLOTS_DIR / f"{stem}-reward_vs_kl.png"))
    if len(runs) == 1:
        made.append(eval_grid(runs[0].rows, out_dir / PLOTS_DIR / f"{stem}-eval.png"))
    return [html.image(p.relative_to(out_dir).as_posix(), p.stem) for p in made if p is not None]


def _section(index: int, run: RunData, out_dir: Path) -> str:
    warned = [str(w) for w in check(run.rows)] if run.stage == "rlhf" else []
    monitors = f"<h3>Reward-hacking monitors</h3>{html.warnings(warned)}" if run.stage == "rlhf" else ""
    steps = max((r["step"] for r in run.rows), default=0)
    return (f'<h2 id="run-{index}">{html.esc(run.label)} <span class="muted">({html.esc(run.stage)}, '
            f"{steps} steps, {html.esc(run.path)})</span></h2>{monitors}<h3>Held-out evaluation</h3>"
            f"{_final_eval(run)}{''.join(_plots([run], out_dir, f'{index}-{safe_name(run.label)}'))}"
            f"{_samples(run, out_dir)}")


def write_report(run_dirs: Sequence[Path], out_dir: Optional[Path] = None,
                 before_after: Optional[str] = None) -> Path:
    """Write `report.html` and its plots for `run_dirs` into `out_dir` (default: `default_out_dir`); returns
    the page's path. `before_after`: the pipeline's table as text (default: made from the runs when they are
    a pipeline's stages, see `pipeline_table`). The PNGs of an earlier report in `out_dir/plots` are replaced."""
    if not run_dirs:
        raise ConfigError("report: give at least one run directory")
    runs = [load_run(Path(p)) for p in run_dirs]
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in (out_dir / PLOTS_DIR).glob("*.png"):  # a previous report's plots: a panel may be gone now
        old.unlink()
    if before_after is None and len(runs) > 1:
        before_after = pipeline_table(runs)
    body = ["<p>" + " · ".join(f'<a href="#run-{i}">{html.esc(r.label)}</a> ({html.esc(r.stage)})'
                               for i, r in enumerate(runs)) + "</p>"]
    if before_after:
        body.append(f"<h2>Before / after</h2><pre>{html.esc(before_after.strip())}</pre>")
    by_stage: dict[str, list[RunData]] = {}
    for run in runs:
        by_stage.setdefault(run.stage, []).append(run)
    for stage, group in by_stage.items():
        if len(group) > 1:
            body.append(f"<h2>Compared: {html.esc(stage)} runs</h2>"
                        + "".join(_plots(group, out_dir, f"compare-{stage}")))
    body += [_section(i, run, out_dir) for i, run in enumerate(runs)]
    title = "Run report: " + ", ".join(r.label for r in runs)
    page = out_dir / REPORT_FILE
    page.write_text(html.page(title, body), encoding="utf-8")
    return page
