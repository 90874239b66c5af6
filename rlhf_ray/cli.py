"""`rlhf-ray <command> CONFIG [key=value ...]`: one launcher for every stage.

    rlhf-ray sft configs/tiny-cpu/sft.yaml learner.num_ranks=2 run.max_steps=200
    rlhf-ray sft --help                  # every config key with its type, default and meaning
    rlhf-ray rm configs/tiny-cpu/rm.yaml data.train=data/generated/ranking_train.jsonl
    rlhf-ray dpo configs/tiny-cpu/dpo.yaml loss.type=simpo   # the policy trained on feedback directly
    rlhf-ray synth-data data/generated   # the synthetic task and feedback files the tiny presets use
    rlhf-ray label configs/tiny-cpu/label.yaml server.port=8000   # the labeling page
    rlhf-ray label-summary configs/tiny-cpu/label.yaml            # counts, agreement, A/B win rate
    rlhf-ray eval runs/rlhf-tiny/model configs/tiny-cpu/rlhf.yaml --baseline runs/sft-tiny/model
    rlhf-ray report runs/demo-sft runs/demo-rm runs/demo-rlhf     # report.html + plots of run directories
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
from rlhf_ray.stages.guards import BadStepsError
from rlhf_ray.stages.stops import RoleLostError
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
# Errors that stop a run cleanly (exit status 3): printed as a message, which names what failed and where the
# run can continue from, not as a traceback.
RUN_STOPS: tuple[type[BaseException], ...] = (RoleLostError, BadStepsError)
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


def _eval_parser(sub) -> None:
    from rlhf_ray.stages import evaluate  # light: its heavy imports are inside its functions

    parser = sub.add_parser(
        "eval", help="Evaluate a policy on held-out prompts (reward, accuracy, KL, length); write A/B files",
        description=(evaluate.__doc__ or "") + "\nconfig keys (an RLHF config):\n" + config_help(RLHFConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the policy to evaluate: a model directory, hub name or tiny:<preset>")
    parser.add_argument("config", nargs="?", help="RLHF YAML config (e.g. configs/tiny-cpu/rlhf.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.num_generate=32")
    parser.add_argument("--baseline", default=None,
                        help="model B of the A/B files, evaluated too (default: the reference; none: no A/B files)")
    parser.add_argument("--reference", default=None,
                        help="reference of the KL (default: reference.path, else the config's policy.path; "
                             "none: no KL)")
    parser.add_argument("--output-dir", default=None,
                        help="where metrics.json and the A/B files go (default: <run.output_dir>/<run.name>-eval)")


def _run_eval(args) -> None:
    from rlhf_ray.stages.evaluate import plan_eval, run_eval

    config, overrides = _split_config(args.config, args.overrides)
    cfg = load_config(RLHFConfig, config, overrides)
    run_eval(plan_eval(cfg, args.model, args.reference, args.baseline, args.output_dir))


def _report_parser(sub) -> None:
    # Takes run directories, not a config: outside the STAGE_RUNNERS / COMMAND_CONFIGS tables.
    parser = sub.add_parser("report", help="write report.html and PNG plots of one or more run directories",
                            description="Plots (loss, reward and its components, KL, length, accuracy, logprob "
                                        "gap, phase times, eval curves, reward vs KL), reward-hacking monitors, "
                                        "the pipeline's before/after table and sample answers, as report.html.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<name>)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: <run>/report for one run; <parent>/<common name "
                             "prefix>-report for several)")


def _run_report(args: argparse.Namespace) -> None:
    from rlhf_ray.report.build import write_report

    print(f"[report] {write_report(args.run_dirs, args.out)}")


def _split_config(config: Optional[str], overrides: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """(config file, overrides): a first positional that is an override is not a config file."""
    overrides = list(overrides)
    if config is not None and _is_override(config):
        return None, [config, *overrides]  # only overrides were given
    return config, overrides


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
    _eval_parser(sub)
    _report_parser(sub)
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
        if args.command == "report":  # RUN_DIRs, no config
            _run_report(args)
            return 0
        if args.command == "eval":  # MODEL, then the config and overrides
            _run_eval(args)
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
    except RUN_STOPS as err:  # the run stopped for a fault it cannot survive; the message says how to go on
        print(f"rlhf-ray {args.command}: stopped: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
