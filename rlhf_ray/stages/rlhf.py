"""RLHF: the single controller. Per step:

    rollouts   = generators.generate(prompts)                      vLLM engines, n samples per prompt
    ref, score = reference.logprobs(rollouts), reward.score(...)   in parallel, with the policy's own
    old, value = learners.logprobs(rollouts), critic.values(...)   logprobs and (PPO) the critic's values
    experience = make_experience(...)                              KL, token rewards, advantages (a Ray task)
    learners.train_step(experience), critic.train_step(...)        ppo_epochs x num_minibatches updates
    sync(learners -> generators)                                   broadcast (or object store)

Every batch is an ObjectRef to an Arrow table made by the role that produced it; the driver holds refs, row
indices and the step's small statistics, never a batch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray
from tqdm.auto import tqdm

from rlhf_ray.algorithms.kl import make_kl_controller
from rlhf_ray.algorithms.logprobs import scoring_temperature
from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import ConfigError
from rlhf_ray.data.prompts import load_prompts
from rlhf_ray.data.sft import split_eval
from rlhf_ray.distributed.runtime import ray_session
from rlhf_ray.distributed.worker_group import shard_rows
from rlhf_ray.models.loading import load_tokenizer
from rlhf_ray.report.monitors import MonitorLog
from rlhf_ray.rewards import load_reward_function
from rlhf_ray.rewards.checker import load_checker
from rlhf_ray.roles.generator import Sampling
from rlhf_ray.rollout.experience import ExperienceParams
from rlhf_ray.stages.common import (
    MetricsLogger,
    PhaseTimer,
    RunDir,
    StepSampler,
    read_metrics,
    read_trainer_state,
    run_steps,
)
from rlhf_ray.stages.dynamic_sampling import Collected, collect
from rlhf_ray.stages.guards import BadStepGuard
from rlhf_ray.stages.recovery import Recovery, get_fail_fast, shard_ranks, wait_within
from rlhf_ray.stages.rlhf_roles import Roles, needed_cpus
from rlhf_ray.stages.rlhf_tasks import concat_tables, make_experience, read_table, summarize_eval, write_table
from rlhf_ray.stages.supervised import StageResult


def run_rlhf(cfg: RLHFConfig, loop_cls: Optional[type[RLHFLoop]] = None) -> StageResult:
    """The RLHF stage. `loop_cls`: an `RLHFLoop` subclass to drive it (e.g. the memory soak's, which samples
    every actor's memory between steps); None: `RLHFLoop`."""
    cfg.reward.require_source()
    tokenizer = load_tokenizer(cfg.policy)
    for fn in cfg.reward.functions:  # fail on a bad import path before any actor starts
        load_reward_function(fn.path)
    load_checker(cfg.eval.checker)
    prompts, eval_prompts, stats = load_prompt_splits(cfg, tokenizer)
    tqdm.write(f"[rlhf] prompts: {json.dumps(stats)}; eval prompts: {eval_prompts.num_rows}")
    run_dir = RunDir(cfg.run.output_dir, cfg.run.name)
    resume_from = run_dir.prepare(cfg, cfg.run.resume)
    with ray_session(cfg.run.ray_address, max(cfg.run.num_cpus or 0, needed_cpus(cfg)) or None,
                     log_level=cfg.run.log_level):
        roles = Roles.create(cfg)
        try:
            loop = (loop_cls or RLHFLoop)(cfg, roles, ray.put(prompts), prompts.num_rows, ray.put(eval_prompts),
                            eval_prompts.num_rows, run_dir)
            return loop.run(resume_from)
        finally:
            roles.shutdown()


def load_prompt_splits(cfg: RLHFConfig, tokenizer: Any) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """(train prompts, held-out prompts, load stats). Without `data.eval`, a seeded `data.eval_fraction` of the
    training prompts is held out and never trained on. At most `eval.num_generate` prompts are held out."""
    data, limit = cfg.data, cfg.eval.num_generate
    if limit < 1:
        raise ConfigError(f"eval.num_generate: RLHF evaluates on held-out prompts; must be >= 1, got {limit}")
    prompts, stats = load_prompts(data.train, tokenizer, data.max_prompt_length, data.skip_invalid, data.split)
    if data.eval:
        eval_prompts, _ = load_prompts(data.eval, tokenizer, data.max_prompt_length, data.skip_invalid, data.split,
                                       limit=limit)
        return prompts, eval_prompts, stats
    train_rows, eval_rows = split_eval(prompts.num_rows, data.eval_fraction, limit, cfg.run.seed)
    if not eval_rows:
        raise ConfigError(f"data.eval is null and {data.train} has {prompts.num_rows} prompt(s): too few to hold "
                          "any out for evaluation; give data.eval")
    stats["held_out_for_eval"] = len(eval_rows)
    return prompts.take(train_rows), prompts.take(eval_rows), stats


def eval_max_new_tokens(cfg: RLHFConfig) -> int:
    """The longest held-out answer: eval.max_new_tokens, or (null) as long as the rollouts'."""
    tokens = cfg.eval.max_new_tokens
    return cfg.generator.max_new_tokens if tokens is None else tokens


class RLHFLoop:
    """The RLHF stage as a `StageLoop` for `run_steps`: one step = generate, score, advantages, train, sync."""

    name = "rlhf"

    def __init__(self, cfg: RLHFConfig, roles: Roles, prompts_ref: ray.ObjectRef, num_prompts: int,
                 eval_ref: ray.ObjectRef, num_eval: int, run_dir: RunDir):
        self.cfg, self.roles, self.run_dir = cfg, roles, run_dir
        self.prompts_ref, self.eval_ref, self.num_eval = prompts_ref, eval_ref, num_eval
        self.num_prompts = num_prompts
        algo = cfg.algorithm
        self.sampler = StepSampler(num_prompts, algo.prompts_per_step, 1, cfg.run.seed)
        self.kl = make_kl_controller(algo.kl_controller, algo.kl_coef, algo.kl_target, algo.kl_horizon)
        self.logger = MetricsLogger(run_dir.path)
        self.timer = PhaseTimer()
        self.monitors = MonitorLog()
        self.recovery = Recovery(roles, run_dir, cfg.run.max_restarts)
        self.guard = BadStepGuard(cfg.run.max_bad_steps)
        # Off-policy: step -> ref to its rollouts, generated during the step before (at most one).
        self._pending: dict[int, ray.ObjectRef] = {}

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self, resume_from: Optional[Path]) -> StageResult:
        cfg = self.cfg
        start = 0
        try:
            if resume_from is not None:
                start = self.restore(resume_from)
            elif cfg.eval.at_start:
                self.evaluate(0)
            final = run_steps(self, cfg.run, start)
            model_dir = Path(self.roles.learners.save_model(self.run_dir.model))
            if self.roles.critic is not None:
                self.roles.critic.save_model(self.run_dir.path / "critic")
            tqdm.write(f"[rlhf] policy saved to {model_dir}")
            return StageResult(self.run_dir.path, model_dir, final)
        finally:
            self.logger.close()

    @property
    def total_steps(self) -> int:
        return self.cfg.run.max_steps

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{metrics['reward/mean']:.3f}", **({"kl": f"{metrics['kl']:.3f}"} if "kl" in metrics else {})}

    def step(self, step: int) -> dict[str, Any]:
        """Generate (or take the batch generated during the previous step), score, make experience, train,
        sync. With algorithm.off_policy_steps=1 the next step's rollouts are generated while this one scores
        and trains, by the weights of before this step's update; the sync waits for them. A generator, reference
        or reward actor that dies or hangs before the update is replaced and the step retried from its start
        (`stages.recovery`); one that dies during the sync is replaced and the sync redone."""
        cfg, roles, timer, recovery = self.cfg, self.roles, self.timer, self.recovery
        began = time.perf_counter()
        prefetched_ref, generator_restarts = self._pending.get(step), recovery.generator_restarts

        def attempt() -> tuple[ray.ObjectRef, dict[str, Any], Optional[Collected], bool]:
            timer.pop()  # a failed attempt's phases do not count
            if prefetched_ref is not None and recovery.generator_restarts == generator_restarts:
                self._pending[step] = prefetched_ref  # (after a generator restart it is regenerated instead)
            return self._experience(step)

        experience, stats, collected, prefetched = recovery.run(f"step {step + 1}", attempt)
        n = collected.num_rows if collected else cfg.rollouts_per_step
        # A NaN/inf reward or advantage: no update at all (the learners never see the batch).
        bad = self._bad(step, stats, "score or advantages")
        if not bad:
            with timer.phase("train"):  # a short dynamic-sampling step's filler rows weigh nothing
                trained = recovery.run(f"step {step + 1} (train)",
                                       lambda: self.train(experience, cfg.rollouts_per_step, step), retry=False)
            stats.update(trained)
            # A non-finite loss or gradient: the learners skipped that update (weights, moments, LR as they were).
            bad = trained["skipped_updates"] > 0 and self._bad(step, trained, "train", phase="train")
        if self._pending:  # off-policy: the next batch must be complete before the weights change
            with timer.phase("generate_wait"):
                ray.wait(list(self._pending.values()), num_returns=len(self._pending), fetch_local=False)
        if not bad:
            with timer.phase("sync"):
                stats.update(recovery.run(f"step {step + 1} (weight sync)", roles.sync.sync))
            self.kl.update(stats.get("kl", 0.0), n)  # no KL logged without a reference (the fixed 0 coefficient)
        self.guard.record(bad)  # raises BadStepsError after run.max_bad_steps bad steps in a row
        seconds = time.perf_counter() - began
        times = timer.pop()
        busy = stats.pop("learner_busy_seconds", 0.0)
        stats.update(times, kl_coef=self.kl.value, step_time=seconds,
                     learner_idle_fraction=max(0.0, 1.0 - busy / seconds))
        stats.update(recovery.metrics(), **self.guard.metrics())
        if collected:
            stats.update(collected.metrics)
            generated = collected.metrics["dynamic_sampling/generated_tokens"]  # every round's, dropped ones too
            stats["generate_tokens_per_s"] = generated / times["time/generate"]
        elif not prefetched:  # a prefetched batch was generated during the previous step: no time of its own here
            stats["generate_tokens_per_s"] = stats["response_length"] * n / times["time/generate"]
        return stats

    def _bad(self, step: int, stats: dict[str, Any], what: str, phase: Optional[str] = None) -> bool:
        """Whether `stats` hold a non-finite value or a non-zero `nonfinite/` count (`stages.guards`); says so."""
        name = self.guard.check(step + 1, phase, stats)
        if name is not None:
            tqdm.write(f"[rlhf] step {step + 1}: {name}={stats[name]} in the {what}; the step's update is skipped "
                       f"({self.guard.in_a_row + 1} in a row; run.max_bad_steps={self.guard.max_bad_steps})")
        return name is not None

    def _experience(self, step: int) -> tuple[ray.ObjectRef, dict[str, Any], Optional[Collected], bool]:
        """Everything of a step before the update: (experience ref, its statistics, the dynamic-sampling
        collection or None, whether the rollouts were generated during the previous step)."""
        cfg, roles, timer = self.cfg, self.roles, self.timer
        with timer.phase("generate"):  # with dynamic sampling: every round, its reward scoring and filter
            prefetched = step in self._pending
            collected = self._collect(step) if cfg.algorithm.dynamic_sampling else None
            if collected:
                rollouts = collected.rollouts
            else:
                rollouts = self._pending.pop(step) if prefetched else self._generate(step)
            ray.wait([rollouts], fetch_local=False)
        if cfg.algorithm.off_policy_steps and step + 1 < cfg.run.max_steps:
            self._pending[step + 1] = self._generate(step + 1)
        n = collected.num_rows if collected else cfg.rollouts_per_step
        with timer.phase("score"):
            started = time.monotonic()
            scores = roles.score(rollouts, n, reward=collected.rewards if collected else None)
            self._wait_scores(scores, n, started, scored=collected is not None)
        with timer.phase("advantages"):
            experience, stats_ref = make_experience.options(num_returns=2).remote(
                rollouts, scores, params=self._params(), rollout_path=self._rollout_path(step),
                pad_to=cfg.rollouts_per_step if collected else None)
            stats = ray.get(stats_ref)
        if collected:  # NaN rewards of every round, dropped ones too (see dynamic_sampling.keep_informative)
            stats["nonfinite/rewards"] = collected.metrics["dynamic_sampling/nonfinite_rewards"]
        return experience, stats, collected, prefetched

    def _wait_scores(self, scores: Any, n: int, started: float, scored: bool = False) -> None:
        """Wait for every scorer's calls; a reward or reference call past its role's timeout_s raises
        `ScorerTimeout` (its actor is then replaced). `scored`: the reward was computed already."""
        roles, cfg = self.roles, self.cfg
        if not scored:
            wait_within("reward", scores.reward, shard_ranks(n, len(roles.reward.actors)), cfg.reward.timeout_s,
                        started)
        if roles.reference is not None:
            wait_within("reference", scores.reference, shard_ranks(n, len(roles.reference.actors)),
                        cfg.reference.timeout_s, started)
        pending = scores.refs()
        ray.wait(pending, num_returns=len(pending), fetch_local=False)

    def _collect(self, step: int) -> Collected:
        """Dynamic sampling: rounds of generation and reward scoring until the step has prompts_per_step
        informative groups (see `stages.dynamic_sampling`)."""
        cfg = self.cfg
        short = collect(
            self.sampler.shards(step)[0], self.num_prompts,
            generate=lambda rows, round_: self._generate(step, rows, round_),
            score=self._score_round,
            params=self._params(), prompts_per_step=cfg.algorithm.prompts_per_step,
            samples=cfg.generator.samples_per_prompt, max_rounds=cfg.algorithm.dynamic_sampling_max_rounds,
            seed=[cfg.run.seed, step])
        if short.metrics["dynamic_sampling/shortfall_groups"]:
            tqdm.write(f"[rlhf] step {step + 1}: dynamic sampling kept "
                       f"{short.metrics['dynamic_sampling/groups_trained']:.0f} of {cfg.algorithm.prompts_per_step} "
                       f"groups in {short.metrics['dynamic_sampling/rounds']:.0f} rounds; training on those")
        return short

    def _score_round(self, rollouts: ray.ObjectRef, n: int) -> list[ray.ObjectRef]:
        """A dynamic-sampling round's reward calls, waited for within reward.timeout_s (a hung reward actor is
        then replaced and the step retried, as in the score phase)."""
        reward, started = self.roles.reward, time.monotonic()
        refs = reward.map_shards(list(range(n)), lambda a, shard: a.score.remote(rollouts, shard))
        wait_within("reward", refs, shard_ranks(n, len(reward.actors)), self.cfg.reward.timeout_s, started)
        return refs

    def _generate(self, step: int, rows: Optional[list[int]] = None, round_: int = 0) -> ray.ObjectRef:
        """Start generating step `step`'s rollouts (its prompts, or `rows`: a dynamic-sampling refill round
        `round_`; its seed); a ref to the joined table."""
        seed = _step_seed(self.cfg.run.seed, step) if round_ == 0 else _step_seed(self.cfg.run.seed, step, round_)
        sampling = Sampling.of(self.cfg.generator, seed=seed)
        rows = self.sampler.shards(step)[0] if rows is None else rows
        return concat_tables.remote(*self.roles.generators.generate(self.prompts_ref, rows, sampling))

    def train(self, experience: ray.ObjectRef, n: int, step: int) -> dict[str, float]:
        """ppo_epochs passes, each num_minibatches optimizer steps over a seeded shuffle of the rollouts; the
        policy and the critic (separate groups) train each minibatch at the same time."""
        algo, roles = self.cfg.algorithm, self.roles
        began = time.perf_counter()
        sums: dict[str, float] = {}
        updates = 0
        for epoch in range(algo.ppo_epochs):
            order = np.random.default_rng([self.cfg.run.seed, step, epoch]).permutation(n).tolist()
            size = n // algo.num_minibatches
            for mb in range(algo.num_minibatches):
                chunk = order[mb * size:(mb + 1) * size]
                policy = roles.learners.start_train_step(experience, shard_rows(chunk, roles.learners.num_ranks))
                critic = (roles.critic.start_train_step(experience, shard_rows(chunk, roles.critic.num_ranks))
                          if roles.critic is not None else None)
                metrics = get_fail_fast(policy)[0]  # a dead rank's error at once, not after its peer's timeout
                if critic is not None:
                    value = get_fail_fast(critic)[0]
                    metrics.update(value_loss=value["loss"], critic_skipped=value.get("skipped", 0.0))
                for key, value in metrics.items():
                    sums[key] = max(sums.get(key, value), value) if key.endswith("/max") else sums.get(key, 0.0) + value
                updates += 1
        lifted = ("logprob_gap/", "rollout_is/")  # rollout-policy statistics the learner measured: top level
        own = ("value_loss", "critic_skipped", "tokens", "busy_seconds")
        out = {k if k.startswith(lifted) else f"policy/{k}": v if k.endswith("/max") else v / updates
               for k, v in sums.items() if k not in own}
        if "value_loss" in sums:
            out["value_loss"] = sums["value_loss"] / updates
        # Updates a learner skipped for a non-finite loss or gradient (policy and critic): the step is bad.
        out["skipped_updates"] = sums.get("skipped", 0.0) + sums.get("critic_skipped", 0.0)
        out["train_tokens_per_s"] = sums.get("tokens", 0.0) / (time.perf_counter() - began)
        out["learner_busy_seconds"] = sums.get("busy_seconds", 0.0)
        return out

    # -- evaluation, checkpoints ----------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, Any]:
        """Greedy answers to held-out prompts: reward, task-checker accuracy, KL to the reference, length."""
        return self.recovery.run(f"evaluation at step {step}", lambda: self._evaluate(step))

    def _evaluate(self, step: int) -> dict[str, Any]:
        roles = self.roles
        rows = list(range(self.num_eval))
        parts = roles.generators.generate(self.eval_ref, rows,
                                          Sampling.greedy(eval_max_new_tokens(self.cfg), seed=self.cfg.run.seed))
        rollouts = concat_tables.remote(*parts)
        # Greedy logprobs come from vLLM untempered: the reference scores them at temperature 1 too.
        started = time.monotonic()
        scores = roles.score(rollouts, len(rows), policy=False, temperature=scoring_temperature(0.0))
        self._wait_scores(scores, len(rows), started)
        metrics, samples = ray.get(summarize_eval.remote(rollouts, scores.reference, scores.reward,
                                                          self.cfg.algorithm.kl_estimator, self.cfg.eval.num_print,
                                                          self.cfg.eval.checker))
        for prompt, response, score in samples:
            tqdm.write(f"  [step {step}] {prompt!r:44.44} -> {response!r} (score {score:+.3f})")
        self.logger.log(step, metrics, prefix="eval")
        tqdm.write(f"[rlhf] eval @ step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        # Reward-hacking monitors over the whole logged history (train and eval rows), each warning once.
        for warning in self.monitors.new_warnings(read_metrics(self.run_dir.path)):
            tqdm.write(str(warning))
        return metrics

    def checkpoint(self, step: int) -> None:
        staging = self.run_dir.staging_path(step)
        self.roles.learners.save_checkpoint(staging / "policy")
        if self.roles.critic is not None:
            self.roles.critic.save_checkpoint(staging / "critic")
        state = {"step": step, "stage": "rlhf", "kl_controller": self.kl.state_dict(),
                 "bad_steps": self.guard.state_dict()}
        if step in self._pending:  # off-policy: the batch generated on the weights before this checkpoint's
            ray.get(write_table.remote(self._pending[step], str(staging / PENDING_ROLLOUTS)))
            state["pending_rollouts"] = PENDING_ROLLOUTS
        final = self.run_dir.commit_checkpoint(staging, step, state, self.cfg.run.keep_checkpoints)
        tqdm.write(f"[rlhf] checkpoint {final}")

    def restore(self, checkpoint: Path) -> int:
        state = read_trainer_state(checkpoint)
        self.roles.learners.load_checkpoint(checkpoint / "policy")
        if self.roles.critic is not None:
            self.roles.critic.load_checkpoint(checkpoint / "critic")
        self.kl.load_state_dict(state["kl_controller"])
        self.guard.load_state_dict(state.get("bad_steps", {}))
        # The generators started from policy.path: give them the restored weights.
        self.recovery.run("weight sync after resume", self.roles.sync.sync)
        if state.get("pending_rollouts") and self.cfg.algorithm.off_policy_steps:
            # Generated by the weights one update older than the restored ones: exactly what the run had.
            self._pending[int(state["step"])] = read_table.remote(str(checkpoint / state["pending_rollouts"]))
        tqdm.write(f"[rlhf] resumed from {checkpoint} at step {state['step']}")
        return int(state["step"])

    def _params(self) -> ExperienceParams:
        algo = self.cfg.algorithm
        return ExperienceParams(advantage=algo.advantage, kl_coef=self.kl.value, kl_estimator=algo.kl_estimator,
                                kl_in_reward=algo.kl_in == "reward", gamma=algo.gamma, lam=algo.lam,
                                whiten_advantages=algo.whiten_advantages,
                                overlong_buffer=algo.overlong_buffer or 0, overlong_penalty=algo.overlong_penalty,
                                max_new_tokens=self.cfg.generator.max_new_tokens)

    def _rollout_path(self, step: int) -> Optional[str]:
        every = self.cfg.run.save_rollouts_every
        if every and (step + 1) % every == 0:
            return str(self.run_dir.path / "rollouts" / f"step_{step + 1:08d}.parquet")
        return None


PENDING_ROLLOUTS = "pending_rollouts.parquet"


def _step_seed(seed: int, step: int, *more: int) -> int:
    return int(np.random.default_rng([seed, step, 7, *more]).integers(0, 2**31 - 1))
