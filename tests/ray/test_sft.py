"""SFT on a real learner group: Ray actors, DeepSpeed ZeRO (gloo on CPU), the tiny Qwen2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import SFTConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.synthetic import write_sft_dataset
from rlhf_ray.stages.common import read_metrics
from rlhf_ray.stages.sft import run_sft


@pytest.fixture(scope="module")
def reverse_data(tmp_path_factory) -> dict[str, Path]:
    return write_sft_dataset(tmp_path_factory.mktemp("data"), tasks=("reverse",), n_train=2000, n_eval=64, seed=3)


def sft_config(data: dict[str, Path], out: Path, name: str, *overrides: str) -> SFTConfig:
    base = [f"data.train={data['train']}", f"data.eval={data['eval']}", "data.max_length=48",
            f"run.output_dir={out}", f"run.name={name}", "run.resume=never", "learner.num_ranks=2",
            "learner.lr_schedule=constant", "eval.num_print=0", "eval.max_new_tokens=10"]
    return load_config(SFTConfig, None, base + list(overrides))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if m["split"] == "train"}


def eval_records(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m["split"] == "eval"]


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sft_zero2_learns_the_task(ray_cluster, reverse_data, tmp_path, tiny_model_path, tiny_tokenizer):
    cfg = sft_config(reverse_data, tmp_path, "zero2", "learner.zero_stage=2", "learner.micro_batch_size=32",
                     "learner.lr=2e-3", "learner.warmup_steps=20", "run.max_steps=220", "run.log_every=5",
                     "eval.num_generate=64")
    result = run_sft(cfg)

    losses = train_losses(result.run_dir)
    assert losses[220] < 0.5 * losses[5]
    before, after = eval_records(result.run_dir)
    assert before["step"] == 0 and after["step"] == 220
    assert after["loss"] < 0.5 * before["loss"]
    # The task checker judges greedy answers to held-out words the model never saw.
    assert after["accuracy"] >= before["accuracy"] + 0.4, (before, after)

    trained, initial = load_state(result.model_dir), load_state(Path(tiny_model_path))
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)

    # The saved directory is an ordinary HF model: transformers answers like the learner did.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "reverse\nplanet"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "tenalp"


def test_sft_zero3_trains_and_saves_full_weights(ray_cluster, reverse_data, tmp_path):
    cfg = sft_config(reverse_data, tmp_path, "zero3", "learner.zero_stage=3", "learner.micro_batch_size=16",
                     "learner.lr=2e-3", "run.max_steps=25", "eval.num_generate=0", "eval.at_start=false")
    result = run_sft(cfg)
    losses = train_losses(result.run_dir)
    assert losses[25] < losses[1] - 0.5

    # Rank 0 gathered the ZeRO-3 partitions: plain transformers on the saved model reproduces the learner's
    # held-out loss, so no parameter was saved empty or stale.
    from transformers import AutoModelForCausalLM

    from rlhf_ray.algorithms.losses import sft_loss
    from rlhf_ray.data.collate import collate_sft
    from rlhf_ray.data.sft import load_sft_data
    from rlhf_ray.models.loading import load_tokenizer

    data = load_sft_data(cfg.data, load_tokenizer(cfg.model), cfg.run.seed)
    model = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    batch = collate_sft(data.eval, list(range(data.eval.num_rows)), pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss_sum, count = sft_loss(logits, batch.input_ids, batch.loss_mask)
    assert math.isclose((loss_sum / count).item(), result.metrics["loss"], rel_tol=1e-4)


def test_rank_and_accumulation_split_give_the_same_losses(ray_cluster, reverse_data, tmp_path):
    """2 ranks x micro-batch 2 and 1 rank x micro-batch 2 x accumulation 2 are the same optimisation."""
    common = ["learner.zero_stage=2", "learner.micro_batch_size=2", "learner.lr=1e-3", "run.max_steps=4",
              "eval.num_generate=0", "eval.at_start=false"]
    two_ranks = run_sft(sft_config(reverse_data, tmp_path, "ranks", *common, "learner.num_ranks=2"))
    accumulated = run_sft(sft_config(reverse_data, tmp_path, "accum", *common, "learner.num_ranks=1",
                                     "learner.grad_accum=2", "learner.placement.cpus=2"))
    a, b = train_losses(two_ranks.run_dir), train_losses(accumulated.run_dir)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert a[4] != a[1]  # the parameters did move between steps
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-5, abs_tol=1e-6), (step, a, b)


def test_resume_continues_the_same_curve(ray_cluster, reverse_data, tmp_path):
    common = ["learner.zero_stage=2", "learner.micro_batch_size=8", "learner.lr=2e-3", "learner.warmup_steps=2",
              "learner.lr_schedule=cosine", "run.max_steps=6", "run.save_every=3", "eval.num_generate=0",
              "eval.at_start=false"]
    full = run_sft(sft_config(reverse_data, tmp_path, "full", *common))
    checkpoint = full.run_dir / "checkpoints" / "step_00000003"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed = run_sft(sft_config(reverse_data, tmp_path, "resumed", *common, f"run.resume={checkpoint}"))
    a, b = train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert math.isclose(a[step], b[step], rel_tol=1e-6, abs_tol=1e-7), (step, a, b)
