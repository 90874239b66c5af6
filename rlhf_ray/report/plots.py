"""The run report's plots: one PNG per panel (loss, reward, KL, ...), drawing whatever keys a run logged.

matplotlib with the Agg backend (files only, no display), chosen per figure through `Figure` rather than
pyplot's global state, so a report can be written from any thread or process.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from rlhf_ray.report.monitors import series

Row = dict


@dataclass(frozen=True)
class Panel:
    """One plot: its file stem, title, y label, and which (split, key) curves it draws."""

    name: str
    title: str
    ylabel: str
    wants: Callable[[str, str], bool]


def _keys(*names: str, prefixes: tuple[str, ...] = (), splits: tuple[str, ...] = ("train", "eval")):
    def wants(split: str, key: str) -> bool:
        return split in splits and (key in names or key.startswith(prefixes))
    return wants


PANELS = (
    Panel("loss", "Loss", "loss", _keys("loss", "policy/loss", "policy/policy_loss", "value_loss")),
    Panel("reward", "Reward and its components", "reward",
          lambda split, key: (split == "train" and key.startswith("reward/") and key != "reward/std")
          or (split == "eval" and key in ("reward", "reward_mean"))),
    Panel("kl", "KL to the reference", "nats per sequence", _keys("kl", "kl_coef", "policy/approx_kl")),
    Panel("response_length", "Response length", "tokens", _keys("response_length")),
    Panel("accuracy", "Accuracy / task score", "score",
          _keys("accuracy", "task_score", "score", "preference_accuracy", "logp_accuracy",
                prefixes=("accuracy/",))),
    Panel("logprob_gap", "Logprob gap, vLLM vs learner", "|Δ log p|", _keys(prefixes=("logprob_gap/",))),
    Panel("phase_times", "Phase times per step", "seconds", _keys("step_time", prefixes=("time/",), splits=("train",))),
)


def numeric_keys(rows: Sequence[Row], split: str) -> list[str]:
    """Every key with a finite number in some `split` row, in first-seen order (step and time left out)."""
    seen: dict[str, None] = {}
    for row in rows:
        if row.get("split") != split:
            continue
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                seen.setdefault(key, None)
    return list(seen)


def _new_figure(width: float = 7.0, height: float = 3.6, left: float = 0.1, right: float = 0.97):
    from matplotlib.figure import Figure  # Agg is Figure's default canvas: no display is ever touched

    # Fixed margins rather than a layout engine: constrained/tight layout draws each figure twice.
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=left, right=right, bottom=0.14, top=0.9)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def safe_name(text: str) -> str:
    """`text` as a file-name part: letters, digits, '-', '_' and '.' only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def panel_plot(runs: Sequence[tuple[str, Sequence[Row]]], panel: Panel, path: Path) -> Optional[Path]:
    """Draw `panel` for every run of `runs` ((label, rows), overlaid; the label is left out for a single run);
    eval curves dashed with markers. None when no run has any of the panel's keys."""
    fig, ax = _new_figure()
    drawn = 0
    for label, rows in runs:
        for split in ("train", "eval"):
            for key in numeric_keys(rows, split):
                if not panel.wants(split, key):
                    continue
                points = series(rows, split, key)
                name = f"{split} {key}" if len(runs) == 1 else f"{label}: {split} {key}"
                style = {"linestyle": "--", "marker": "o", "markersize": 3} if split == "eval" else {}
                ax.plot([s for s, _ in points], [v for _, v in points], label=name, linewidth=1.2, **style)
                drawn += 1
    if not drawn:
        return None
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def frontier_plot(runs: Sequence[tuple[str, Sequence[Row]]], path: Path) -> Optional[Path]:
    """Reward against KL (train rows with both), coloured by step: the reward-vs-KL frontier. A healthy run
    gains reward per nat of KL; a curve that turns right (KL up, reward flat) is drift that buys nothing."""
    fig, ax = _new_figure(6.0, 4.2, left=0.14, right=1.0)
    drawn = False
    for label, rows in runs:
        kl = dict(series(rows, "train", "kl"))
        reward = series(rows, "train", "reward/mean")
        points = [(s, kl[s], r) for s, r in reward if s in kl]
        if not points:
            continue
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        ax.plot(xs, ys, linewidth=0.6, alpha=0.5, label=label if len(runs) > 1 else None)
        dots = ax.scatter(xs, ys, c=[p[0] for p in points], cmap="viridis", s=14, zorder=3)
        drawn = True
    if not drawn:
        return None
    fig.colorbar(dots, ax=ax, label="step")
    ax.set_title("Reward vs KL (train)")
    ax.set_xlabel("KL to the reference (nats per sequence)")
    ax.set_ylabel("reward/mean")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)


def eval_grid(rows: Sequence[Row], path: Path, columns: int = 3) -> Optional[Path]:
    """Every eval key of one run, one small plot each (the held-out curves, whatever the stage reports)."""
    keys = [k for k in numeric_keys(rows, "eval") if len(series(rows, "eval", k)) > 0]
    if not keys:
        return None
    from matplotlib.figure import Figure

    nrows = math.ceil(len(keys) / columns)
    height = 2.4 * nrows + 0.3  # inches; the margins below are fixed inches too, whatever the row count
    fig = Figure(figsize=(3.2 * columns, height), dpi=100)
    axes = fig.subplots(nrows, columns, squeeze=False,
                        gridspec_kw={"left": 0.07, "right": 0.98, "bottom": 0.3 / height, "top": 1 - 0.6 / height,
                                     "hspace": 0.5, "wspace": 0.3})
    for ax, key in zip(axes.flat, keys):
        points = series(rows, "eval", key)
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle("Held-out evaluation", fontsize=10)
    return _save(fig, path)
