"""Configuration shared by every stage: the model, the DeepSpeed learner group, the run directory and
schedule, evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from rlhf_ray.config_loader import ConfigError, doc

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelConfig:
    path: str = doc("Model to start from: a Hugging Face hub name, a local directory, or tiny:<preset> "
                    "(tiny, small, base) for an offline random-init model built into the cache.",
                    "tiny:tiny")
    tokenizer: Optional[str] = doc("Tokenizer name or directory; null uses the model's own.", None)
    dtype: DType = doc("Training dtype; auto is float32 on CPU (bf16 is 3-8x slower without AVX512-BF16) "
                       "and bfloat16 on CUDA.", "auto")
    trust_remote_code: bool = doc("Allow model code from the hub to run (off unless you trust it).", False)
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)


@dataclass(frozen=True)
class PlacementConfig:
    """Where one role's workers (learner ranks, vLLM engines, scorer actors) run: what each reserves in the
    role's Ray placement group. The same section in every role."""

    cpus: float = doc("CPUs each worker reserves.", 1.0, gt=0.0)
    gpus: Optional[float] = doc("GPUs each worker reserves on CUDA (none on CPU); null: the role's default (a "
                                "learner rank 1, an engine its tensor_parallel_size, a scorer 0). A fraction "
                                "shares a GPU with other roles (colocation).", None, ge=0.0)
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "Ray placement group strategy for the role's workers.", "PACK")
    resources: dict[str, float] = doc(
        "Custom Ray resources each worker also reserves, e.g. {train_node: 1} to place the workers on nodes "
        "started with that resource.", default_factory=dict)


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (peft LoRA, https://arxiv.org/abs/2106.09685): W x + (alpha / rank) B A x on each
    target linear layer; only A, B (and a scoring model's head) train. Saved and synced as merged weights."""

    rank: int = doc("Rank r of each adapter's A (r x in) and B (out x r) matrices.", 8, ge=1)
    alpha: float = doc("Scale numerator: the update B A is multiplied by alpha / rank.", 16.0, gt=0.0)
    dropout: float = doc("Dropout on the adapter's input while training (0 keeps a policy's logprobs "
                         "deterministic, which the PPO ratio assumes).", 0.0, ge=0.0, lt=1.0)
    target_modules: Union[str, tuple[str, ...]] = doc(
        "Linear layers that get adapters: all-linear (every linear layer of the backbone, i.e. the attention "
        "and MLP projections, never the output head) or a list of module names, e.g. [q_proj, v_proj] "
        "(matched on the end of each module's name).", "all-linear")

    def __post_init__(self):
        names = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ConfigError(f"learner.lora.target_modules: expected all-linear or a list of module names, got "
                              f"{self.target_modules!r} (write [{self.target_modules}] for that one module)")
        if not names or any(not n.strip() for n in names):
            raise ConfigError(f"learner.lora.target_modules: expected all-linear or a non-empty list of module "
                              f"names, got {list(names)}")


@dataclass(frozen=True)
class LearnerConfig:
    num_ranks: int = doc("Data-parallel ranks (Ray actors) of the DeepSpeed job.", 1, ge=1)
    zero_stage: int = doc("DeepSpeed ZeRO stage: 0 (plain DDP), 1 (optimizer), 2 (+gradients), "
                          "3 (+parameters).", 2, ge=0, le=3)
    micro_batch_size: int = doc("Sequences per rank per forward/backward.", 8, ge=1)
    grad_accum: int = doc("Micro-batches accumulated per optimizer step; a step sees "
                          "num_ranks * micro_batch_size * grad_accum sequences.", 1, ge=1)
    optimizer: Literal["auto", "adamw", "cpu_adam", "fused_adam"] = doc(
        "auto: torch AdamW (nothing to compile), DeepSpeedCPUAdam when offloading the optimizer. "
        "cpu_adam/fused_adam are DeepSpeed ops compiled on first use (about 150 s each on 2 cores).", "auto")
    lr: float = doc("Peak learning rate.", 1e-4, gt=0.0)
    weight_decay: float = doc("AdamW weight decay.", 0.0, ge=0.0)
    adam_betas: tuple[float, ...] = doc("AdamW betas.", (0.9, 0.95))
    lr_schedule: Literal["constant", "linear", "cosine"] = doc("Decay after warmup.", "cosine")
    warmup_steps: int = doc("Linear warmup steps from 0 to lr.", 0, ge=0)
    min_lr_ratio: float = doc("Final lr as a fraction of lr for linear/cosine decay.", 0.1, ge=0.0, le=1.0)
    max_grad_norm: float = doc("Clip the global gradient norm to this; 0 turns clipping off.", 1.0, ge=0.0)
    offload_optimizer: bool = doc("Keep optimizer state in CPU memory (ZeRO-Offload; GPU only).", False)
    device: Device = doc("auto picks CUDA when the ranks see a GPU, else CPU.", "auto")
    placement: PlacementConfig = doc("What each rank reserves (gpus null: 1 per rank on CUDA).",
                                     default_factory=PlacementConfig)
    lora: Optional[LoRAConfig] = doc(
        "Train LoRA adapters (peft) instead of every weight; null: full fine-tuning. A mapping of rank (default 8), "
        "alpha (16: updates scaled by alpha/rank), dropout (0.0) and target_modules (all-linear: every linear "
        "layer of the backbone; or a list such as [q_proj, v_proj]), e.g. learner.lora.rank=16 or "
        "learner.lora={}. The saved model and the weight sync are the merged weights.", None)

    def __post_init__(self):
        if len(self.adam_betas) != 2:
            raise ConfigError(f"learner.adam_betas: expected two numbers, got {list(self.adam_betas)}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("learner.offload_optimizer needs learner.zero_stage >= 1")

    @property
    def gpus_per_rank(self) -> float:
        """GPUs each rank reserves on CUDA."""
        return 1.0 if self.placement.gpus is None else self.placement.gpus

    @property
    def global_batch_size(self) -> int:
        return self.num_ranks * self.micro_batch_size * self.grad_accum


@dataclass(frozen=True)
class RunConfig:
    name: str = doc("Run name; outputs go to <output_dir>/<name>/.", "run")
    output_dir: str = doc("Parent directory of run directories (a path every node can reach on a cluster).",
                          "runs")
    # numpy (data order, np.random.seed in the learner) takes only seeds in [0, 2**32).
    seed: int = doc("Seed for data order, initialisation and sampling.", 0, ge=0, le=2**32 - 1)
    max_steps: int = doc("Optimizer steps to train; -1 derives them from epochs.", -1, ge=-1)
    epochs: float = doc("Passes over the training data when max_steps is -1.", 1.0, gt=0.0)
    log_every: int = doc("Log metrics every N steps.", 1, ge=1)
    eval_every: int = doc("Evaluate every N steps; 0 evaluates only at the end.", 0, ge=0)
    save_every: int = doc("Checkpoint every N steps; 0 checkpoints only at the end.", 0, ge=0)
    keep_checkpoints: int = doc("Checkpoints kept on disk (oldest removed first).", 2, ge=1)
    save_rollouts_every: int = doc("RLHF: write every N-th step's samples (text, score, KL, length) to "
                                   "rollouts/step_N.parquet; 0: never.", 0, ge=0)
    resume: str = doc("auto: continue from the newest checkpoint in the run directory if there is one; "
                      "never: start fresh (fails if the run directory holds checkpoints); "
                      "or the path of a checkpoint directory.", "auto")
    ray_address: Optional[str] = doc("Ray cluster to join (e.g. auto, ray://head:10001); null starts a "
                                     "local Ray instance with its own temp dir.", None)
    num_cpus: Optional[int] = doc("Logical CPUs of the local Ray instance; null uses the machine's core count.",
                                  None, ge=1)
    log_level: Literal["info", "debug"] = doc(
        "What a run prints. info: the stage's own lines and one progress bar; vLLM, Ray and transformers only "
        "at WARNING, repeated vLLM warnings once. debug: everything (vLLM INFO lines, Ray's log-deduplication "
        "notices, transformers INFO, Python deprecation warnings of the workers).", "info")
    loggers: tuple[Literal["tensorboard", "mlflow", "wandb"], ...] = doc(
        "Experiment trackers that get the metrics besides metrics.jsonl (always written), e.g. [tensorboard, "
        "mlflow, wandb]: TensorBoard in <run>/tensorboard; MLflow in a file store <run>/mlruns unless "
        "MLFLOW_TRACKING_URI is set; W&B offline in <run>/wandb unless WANDB_MODE is set. MLflow and W&B need "
        "`pip install 'rlhf_ray[trackers]'`; one not installed is skipped with a warning. [] : metrics.jsonl only.",
        ("tensorboard",))
    max_bad_steps: int = doc(
        "RLHF: steps in a row whose update may be skipped because a reward, advantage, loss or gradient was NaN "
        "or inf (each is skipped and counted in bad_steps/*) before the run stops naming the step, the phase "
        "and the statistic. A skipped step changes no weight, so no checkpoint or model is ever non-finite.",
        3, ge=1)
    max_restarts: int = doc(
        "RLHF: times one step may restart a generator, reference or reward actor that died or timed out "
        "(recreated in its placement bundle, given the current weights, the step retried) before the run stops "
        "naming the role.", 3, ge=0)
    resume_override: bool = doc(
        "Resume even though the model, algorithm or data of this config differ from the checkpoint's run "
        "(config.yaml of the run directory); by default such a resume is refused and the differences listed.",
        False)

    def __post_init__(self):
        if self.max_steps == 0:
            raise ConfigError("run.max_steps: must be -1 (derive from run.epochs) or >= 1, got 0")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on held-out data: the same section in every stage (SFT, RM, RLHF); each field's help says
    which stages use it, and each stage sets its own defaults."""

    at_start: bool = doc("All stages: also evaluate the starting model, so the run shows before and after.", True)
    num_print: int = doc("All stages: held-out samples printed at each evaluation (SFT: greedy answers next to "
                         "their references; RM: items with their rewards; RLHF: greedy answers with "
                         "their scores).", 4, ge=0)
    num_generate: int = doc("SFT, RLHF: held-out prompts answered greedily at each evaluation and graded by "
                            "eval.checker. SFT: 0 skips generation (the held-out loss remains). RLHF: at least 1; "
                            "also the cap on prompts held out of data.train when data.eval is null. RM ignores "
                            "it.", 64, ge=0)
    max_new_tokens: Optional[int] = doc("SFT, RLHF: longest generated answer when evaluating; null (RLHF only, "
                                        "its default): generator.max_new_tokens. RM ignores it.", 32, ge=1)
    checker: Optional[str] = doc(
        "SFT, RLHF: import path `package.module:function` of fn(metadata: dict, response: str) -> float or None "
        "grading a greedy held-out answer (1.0 = correct; None: the row cannot be graded); reported as accuracy "
        "(share of 1.0) and mean score over the graded rows (SFT also per metadata `task`). metadata is the "
        "row's extra fields plus `reference` when the row has an answer. The default grades rows whose metadata "
        "names a synthetic demo task; null: no accuracy metrics. RM ignores it.",
        "rlhf_ray.rewards.tasks:check_answer")
