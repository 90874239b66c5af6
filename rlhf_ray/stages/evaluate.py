"""`rlhf-ray eval MODEL CONFIG`: a policy's held-out metrics, and A/B files for the labeling page.

The config is an RLHF config (`RLHFConfig`, e.g. configs/tiny-cpu/rlhf.yaml): MODEL takes the place of
policy.path, and the evaluation is exactly the RLHF stage's (`RLHFLoop.evaluate`): greedy answers to the held-out
prompts (data.eval, or the same seeded share of data.train the RLHF run held out), scored by the `reward` section
(reward model and/or rule functions), graded by eval.checker, with the KL to a reference and the response length.
Only the roles that need no training start: vLLM generators, reward actors, reference actors (no learner).

- Reference (KL): reference.path, else the config's own policy.path (the SFT model an RLHF run starts from, which
  is that run's reference); `reference="none"` skips the KL.
- Baseline (B of the A/B files): `baseline`, else the reference; its answers are scored and graded the same way,
  so the table shows both models. `baseline="none"` writes no A/B files.

Outputs in `<run.output_dir>/<run.name>-eval/` (or `output_dir`): metrics.json, config.yaml (policy.path = MODEL),
answers_a.jsonl / answers_b.jsonl (rows {prompt, response, <metadata>}, the label page's A/B side files) and
label.yaml, a ready `rlhf-ray label` config (mode ab) over them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import ConfigError

NONE = "none"  # the word that turns the reference or the baseline off
NAME_A, NAME_B = "model", "baseline"  # the A/B names in label.yaml (the summary reports A's win rate over B)


@dataclass(frozen=True)
class EvalPlan:
    """What one `rlhf-ray eval` compares, resolved from the command line and the config."""

    config: RLHFConfig        # the config with policy.path = the evaluated model
    model: str
    reference: Optional[str]  # None: no KL
    baseline: Optional[str]   # None: no baseline, no A/B files
    out_dir: Path


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    metrics: dict[str, Any]            # metrics.json's content
    ab_files: dict[str, Path]          # answers_a, answers_b, label (empty without a baseline)


def plan_eval(cfg: RLHFConfig, model: str, reference: Optional[str] = None, baseline: Optional[str] = None,
              output_dir: Optional[str] = None) -> EvalPlan:
    """Resolve the defaults (see the module docstring): None means the default, "none" means off."""
    if not model or not model.strip():
        raise ConfigError("MODEL: give the directory (or hub name, or tiny:<preset>) of the model to evaluate")
    ref = reference if reference is not None else (cfg.reference.path or cfg.policy.path)
    ref = None if ref.lower() == NONE else ref
    base = baseline if baseline is not None else ref
    base = None if base is None or base.lower() == NONE else base
    out = Path(output_dir) if output_dir else Path(cfg.run.output_dir) / f"{cfg.run.name}-eval"
    evaluated = replace(cfg, policy=replace(cfg.policy, path=model),
                        reference=replace(cfg.reference, path=ref))
    return EvalPlan(evaluated, model, ref, base, out)


def run_eval(plan: EvalPlan) -> EvalResult:
    """Evaluate `plan.model` (and the baseline); write metrics.json, the A/B files; print the table."""
    from tqdm.auto import tqdm

    from rlhf_ray.config_loader import save_config
    from rlhf_ray.distributed.runtime import ray_session
    from rlhf_ray.label.generate import check_model_path
    from rlhf_ray.rewards import load_reward_function
    from rlhf_ray.rewards.checker import load_checker

    cfg = plan.config
    cfg.reward.require_source()
    for key, path in (("MODEL", plan.model), ("reference.path", plan.reference), ("--baseline", plan.baseline)):
        if path:
            check_model_path(path, key)
    for fn in cfg.reward.functions:  # a bad import path fails before any actor starts
        load_reward_function(fn.path)
    load_checker(cfg.eval.checker)
    prompts = {side: _held_out(cfg, path) for side, path in (("model", plan.model), ("baseline", plan.baseline))
               if path}
    tqdm.write(f"[eval] {prompts['model'].num_rows} held-out prompts; model {plan.model}, reference "
               f"{plan.reference or '(none: no KL)'}, baseline {plan.baseline or '(none: no A/B files)'}")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, plan.out_dir / "config.yaml")
    with ray_session(cfg.run.ray_address, max(cfg.run.num_cpus or 0, _needed_cpus(plan)),
                     log_level=cfg.run.log_level):
        answers = _evaluate_all(plan, prompts)
    report = {"model": plan.model, "reference": plan.reference, "baseline": plan.baseline,
              "num_prompts": prompts["model"].num_rows, "metrics": answers["model"][0]}
    if plan.baseline:
        report["baseline_metrics"] = answers["baseline"][0]
    (plan.out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    files = write_ab_files(plan.out_dir, answers["model"][1], answers["baseline"][1]) if plan.baseline else {}
    print(format_table(report))
    print(f"[eval] metrics: {plan.out_dir / 'metrics.json'}")
    if "label" in files:
        print(f"[eval] A/B answers for the labeling page: rlhf-ray label {files['label']}")
    elif files:
        print("[eval] no label.yaml: a model gave no non-empty answer, so the A/B page would have nothing to show")
    return EvalResult(plan.out_dir, report, files)


def _held_out(cfg: RLHFConfig, model: str):
    """The held-out prompt table rendered by `model`'s tokenizer (the same rows as the RLHF stage's eval)."""
    from rlhf_ray.models.loading import load_tokenizer
    from rlhf_ray.stages.rlhf import load_prompt_splits

    _, held_out, _ = load_prompt_splits(cfg, load_tokenizer(replace(cfg.policy, path=model)))
    return held_out


def _needed_cpus(plan: EvalPlan) -> int:
    """Logical CPUs of a local Ray instance: what the roles reserve (on CPU they time-share the cores)."""
    import os

    cfg = plan.config
    engines = cfg.generator.num_engines * cfg.generator.placement.cpus * (2 if plan.baseline else 1)
    scorers = cfg.reward.num_actors * cfg.reward.placement.cpus
    if plan.reference:
        scorers += cfg.reference.num_actors * cfg.reference.placement.cpus
    return max(math.ceil(engines + scorers), os.cpu_count() or 1)


def _evaluate_all(plan: EvalPlan, prompts: dict) -> dict[str, tuple[dict[str, float], list[dict]]]:
    """{side: (metrics, answers)} for the model and the baseline; the engines and scorers start side by side."""
    import ray

    from rlhf_ray.distributed.runtime import cluster_device
    from rlhf_ray.roles.generator import GeneratorGroup

    cfg = plan.config
    device = cluster_device(cfg.learner.device)
    extra = roles = None
    try:  # the baseline's engines start while the other roles do
        if plan.baseline:
            extra = GeneratorGroup(plan.baseline, cfg.generator, cfg.run.seed, device, name="baseline-generator",
                                   wait=False)
        roles = _start_roles(plan, device)
        out = {"model": _evaluate_one(roles, ray.put(prompts["model"]), prompts["model"].num_rows, cfg)}
        if extra is not None:  # the baseline is scored by the same reward actors, without a KL
            extra.ready()
            baseline_roles = replace(roles, generators=extra, reference=None)
            out["baseline"] = _evaluate_one(baseline_roles, ray.put(prompts["baseline"]),
                                            prompts["baseline"].num_rows, cfg)
        return out
    finally:
        for group in (extra, roles):
            if group is not None:
                group.shutdown()


def _start_roles(plan: EvalPlan, device: str):
    """The RLHF stage's `Roles` for evaluation only: generators of the model, reward actors, reference actors
    (when there is a reference); no learner, critic or weight sync (nothing trains, nothing is synced)."""
    from rlhf_ray.distributed.runtime import worker_env_vars
    from rlhf_ray.distributed.worker_group import WorkerGroup, group_spec
    from rlhf_ray.roles.generator import GeneratorGroup
    from rlhf_ray.roles.scorers import ReferenceActor, RewardActor
    from rlhf_ray.stages.rlhf_roles import Roles, check_gpu_shares

    cfg = plan.config
    check_gpu_shares(cfg, device)
    if device == "cuda" and plan.reference and cfg.reference.gpus_per_actor <= 0:
        # check_gpu_shares skips the reference when the RLHF config has none (kl_coef 0); here it has one.
        raise ConfigError("reference.placement.gpus=0 on a CUDA eval: the reference actor would use GPU 0 without "
                          "reserving it; give it a share (e.g. reference.placement.gpus=0.25) or --reference none")
    env = {"env_vars": worker_env_vars(device)}
    ref, rew = cfg.reference, cfg.reward
    generators = GeneratorGroup(plan.model, cfg.generator, cfg.run.seed, device, wait=False)
    reference = None
    if plan.reference:
        # Greedy answers' logprobs come from vLLM untempered, so the reference scores at temperature 1.
        ref_model = replace(cfg.policy, path=plan.reference, gradient_checkpointing=False)
        reference = WorkerGroup(ReferenceActor, group_spec("reference", ref.num_actors, ref.placement,
                                                           ref.gpus_per_actor, device),
                                ref_model, ref.micro_batch_size, device, 1.0, runtime_env=env)
    reward = WorkerGroup(RewardActor, group_spec("reward", rew.num_actors, rew.placement, rew.gpus_per_actor,
                                                 device), rew, device, runtime_env=env)
    generators.ready()
    for group in (reference, reward):
        if group is not None:
            group.wait_started()
    return Roles(generators, reference, reward, learners=None, critic=None, sync=None, pi_old=False)


def _evaluate_one(roles, prompts_ref, n: int, cfg: RLHFConfig) -> tuple[dict[str, float], list[dict]]:
    """The RLHF stage's evaluation of one generator group: (metrics, answers {prompt, response, metadata})."""
    import ray
    from tqdm.auto import tqdm

    from rlhf_ray.algorithms.logprobs import scoring_temperature
    from rlhf_ray.label.items import RESERVED_FIELDS, prompt_value
    from rlhf_ray.roles.generator import Sampling
    from rlhf_ray.stages.rlhf import eval_max_new_tokens
    from rlhf_ray.stages.rlhf_tasks import concat_tables, summarize_eval

    rows = list(range(n))
    parts = roles.generators.generate(prompts_ref, rows, Sampling.greedy(eval_max_new_tokens(cfg), seed=cfg.run.seed))
    rollouts = concat_tables.remote(*parts)
    scores = roles.score(rollouts, n, policy=False, temperature=scoring_temperature(0.0))
    metrics, samples = ray.get(summarize_eval.remote(rollouts, scores.reference, scores.reward,
                                                      cfg.algorithm.kl_estimator, cfg.eval.num_print,
                                                      cfg.eval.checker))
    for prompt, response, score in samples:
        tqdm.write(f"  {prompt!r:44.44} -> {response!r} (score {score:+.3f})")
    table = ray.get(rollouts).select(["prompt_messages", "response_text", "metadata"]).to_pylist()
    answers = [{"prompt": prompt_value(row["prompt_messages"]), "response": row["response_text"],
                **{k: v for k, v in json.loads(row["metadata"]).items() if k not in RESERVED_FIELDS}}
               for row in table]
    return metrics, answers


def write_ab_files(out_dir: Path, answers_a: list[dict], answers_b: list[dict]) -> dict[str, Path]:
    """answers_a.jsonl / answers_b.jsonl (the label page's A/B side files, matched by prompt) and label.yaml, an
    `rlhf-ray label` config (mode ab) over them. Empty answers are left out: the label formats refuse them."""
    from rlhf_ray.data.synthetic import write_jsonl

    files = {"answers_a": out_dir / "answers_a.jsonl", "answers_b": out_dir / "answers_b.jsonl",
             "label": out_dir / "label.yaml"}
    for (side, answers), name in zip((("answers_a", answers_a), ("answers_b", answers_b)), (NAME_A, NAME_B)):
        kept = [a for a in answers if a["response"].strip()]
        write_jsonl(kept, files[side])
        if len(kept) < len(answers):
            print(f"[eval] {name}: {len(answers) - len(kept)} of {len(answers)} answers are empty (e.g. only special "
                  f"tokens) and are left out of {files[side].name}")
        if not kept:  # the label page would refuse an empty side: no label.yaml pointing at it
            files.pop("label", None)
    if "label" not in files:
        (out_dir / "label.yaml").unlink(missing_ok=True)  # a stale one from an earlier eval into this directory
        return files
    label = {"mode": "ab", "output_dir": str((out_dir / "labels").resolve()),
             "ab": {"name_a": NAME_A, "name_b": NAME_B, "candidates_a": str(files["answers_a"].resolve()),
                    "candidates_b": str(files["answers_b"].resolve())}}
    files["label"].write_text("# Blind A/B of the evaluated model (A) against the baseline (B), written by "
                              "rlhf-ray eval.\n" + yaml.safe_dump(label, sort_keys=False), encoding="utf-8")
    return files


def format_table(report: dict[str, Any]) -> str:
    """The metrics as a text table: one row per metric, a column per model."""
    columns = [("model", report["metrics"])]
    if "baseline_metrics" in report:
        columns.append(("baseline", report["baseline_metrics"]))
    keys = list(dict.fromkeys(k for _, m in columns for k in m))
    width = max([len(k) for k in keys] + [6])
    lines = [f"{'metric':<{width}}" + "".join(f"  {name:>10}" for name, _ in columns)]
    for key in keys:
        cells = "".join(f"  {m[key]:>10.4f}" if key in m else f"  {'-':>10}" for _, m in columns)
        lines.append(f"{key:<{width}}{cells}")
    return "\n".join(lines)
