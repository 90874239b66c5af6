"""`rlhf-ray <command> CONFIG [key=value ...]`: one launcher for every stage.

    rlhf-ray sft configs/tiny-cpu/sft.yaml learner.num_ranks=2 run.max_steps=200
    rlhf-ray sft --help                  # every config key with its type, default and meaning
    rlhf-ray rm configs/tiny-cpu/rm.yaml data.train=data/generated/ranking_train.jsonl
    rlhf-ray dpo configs/tiny-cpu/dpo.yaml loss.type=simpo   # the policy trained on feedback directly
    rlhf-ray synth-data data/generated   # the synthetic task and feedback files the tiny presets use
    rlhf-ray label configs/tiny-cpu/label.yaml server.port=8000   # the labeling page
    rlhf-ray label-summary configs/tiny-cpu/label.yaml            # counts, agreement, A/B win rate
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from rlhf_ray.config import DPOConfig, PipelineConfig, RLHFConfig, RMConfig, SFTConfig
from rlhf_ray.config_loader import ConfigError, config_help, load_config
from rlhf_ray.data.errors import DataError
from rlhf_ray.label.config import LabelConfig
from rlhf_ray.rewards import RewardFunctionError

# Each command imports what it runs when it runs: the stages load torch, Ray, DeepSpeed and vLLM (seconds), the
# label server FastAPI and pydantic, label-summary pydantic and numpy (a few hundred ms each), none of which
# `--help` or another command needs.


def _run_sft(cfg) -> None:
    from rlhf_ray.stages.sft import run_sft

    result = run_sft(cfg)
    print(f"[sft] done: run directory {result.run_dir}, model {result.model_dir}")


def _run_rm(cfg) -> None:
    from rlhf_ray.stages.rm import run_rm

    result = run_rm(cfg)
    print(f"[rm] done: run directory {result.run_dir}, reward model {result.model_dir}")


def _run_dpo(cfg) -> None:
    from rlhf_ray.stages.dpo import run_dpo

    result = run_dpo(cfg)
    print(f"[dpo] done: run directory {result.run_dir}, policy {result.model_dir}")


def _run_rlhf(cfg) -> None:
    from rlhf_ray.stages.rlhf import run_rlhf

    result = run_rlhf(cfg)
    print(f"[rlhf] done: run directory {result.run_dir}, policy {result.model_dir}")


def _run_pipeline(cfg) -> None:
    from rlhf_ray.stages.pipeline import run_pipeline

    results = run_pipeline(cfg)
    print("[pipeline] done: " + ", ".join(f"{k} {r.run_dir}" for k, r in results.items()))


def _run_label(cfg) -> None:
    from rlhf_ray.label.server import serve

    serve(cfg)


def _run_label_summary(cfg) -> None:
    from rlhf_ray.label.store import LOG_FILE, read_log
    from rlhf_ray.label.summary import format_summary, summarize

    log = Path(cfg.output_dir) / LOG_FILE
    if not log.is_file():
        raise ConfigError(f"output_dir: {log} does not exist; no judgements yet (start with rlhf-ray label)")
    records, bad = read_log(log)
    summary = summarize(records, cfg.mode, cfg.ab.name_a, cfg.ab.name_b, cfg.ab.ties)
    out = Path(cfg.output_dir) / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(format_summary(summary))
    print(f"\n[label-summary] {out}" + (f"; {bad} unreadable log lines skipped" if bad else ""))


STAGE_RUNNERS: dict[str, Callable] = {"sft": _run_sft, "rm": _run_rm, "dpo": _run_dpo, "rlhf": _run_rlhf,
                                      "pipeline": _run_pipeline, "label": _run_label,
                                      "label-summary": _run_label_summary}
# The config class of each command: its stage's, or the one it reports on.
STAGE_CONFIGS: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "rlhf": RLHFConfig,
                                  "pipeline": PipelineConfig,
                                  "label": LabelConfig}
COMMAND_CONFIGS: dict[str, type] = {**STAGE_CONFIGS, "label-summary": STAGE_CONFIGS["label"]}
HELP_LINES = {"label-summary": "Counts per annotator, agreement between annotators, A/B win rate of the labels "
                               "in a label config's output_dir"}


def _stage_parser(sub, name: str) -> None:
    cls = COMMAND_CONFIGS[name]
    doc = (cls.__doc__ or "").strip()
    if name in HELP_LINES:
        doc = f"{HELP_LINES[name]}.\n\nThe config is that of `rlhf-ray label`: {doc}"
    parser = sub.add_parser(name, help=doc.splitlines()[0],
                            description=doc + "\n\nconfig keys:\n" + config_help(cls),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config file (e.g. configs/tiny-cpu/sft.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. learner.lr=3e-4")


def _synth_parser(sub) -> None:
    parser = sub.add_parser("synth-data", help="write the synthetic SFT and feedback datasets (JSONL) to a directory")
    parser.add_argument("out_dir")
    parser.add_argument("--tasks", default="reverse,sort,add", help="comma-separated tasks of the SFT files")
    parser.add_argument("--feedback-tasks", default="sort",
                        help="tasks of the feedback files (sort: a right answer is recognisable locally, which "
                             "a tiny reward model learns in minutes)")
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)


def _is_override(arg: str) -> bool:
    """Whether the first positional is a `key=value` override rather than a config file path (an override's
    value may itself end in .yaml, e.g. run.name=a.yaml; a path may hold "=", e.g. configs/lr=3e-4.yaml)."""
    return not Path(arg).is_file() and re.match(r"[A-Za-z_][\w.]*=", arg) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_RUNNERS:
        _stage_parser(sub, name)
    _synth_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synth-data":
            from rlhf_ray.data.synthetic import (  # deferred too: 10% of the CLI's start, for this command only
                write_feedback_datasets,
                write_label_candidates,
                write_sft_dataset,
            )

            tasks = tuple(args.tasks.split(","))
            paths = write_sft_dataset(args.out_dir, tasks, args.n_train, args.n_eval, args.seed)
            paths.update(write_feedback_datasets(args.out_dir, tuple(args.feedback_tasks.split(",")), args.n_train,
                                                 args.n_eval, args.seed))
            paths.update(write_label_candidates(args.out_dir, tuple(args.feedback_tasks.split(",")), args.n_eval,
                                                args.seed))
            for split, path in paths.items():
                print(f"{split}: {path}")
            return 0
        config = args.config
        overrides = list(args.overrides)
        if config is not None and _is_override(config):
            overrides.insert(0, config)  # only overrides were given
            config = None
        cfg = load_config(COMMAND_CONFIGS[args.command], config, overrides)
        STAGE_RUNNERS[args.command](cfg)
    except (ConfigError, DataError, RewardFunctionError) as err:
        print(f"rlhf-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
