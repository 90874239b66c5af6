"""The pure parts of scripts/bench_vs_trl.py (order, medians, table, FLOP/s share, the shared workload).

The script is imported by path; none of this needs trl.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.scripts import script_module



@pytest.fixture(scope="module")
def bench():
    with script_module("bench_vs_trl") as module:
        yield module


def test_steady_median_skips_the_first_two_steps(bench):
    # 1-based steps 3..6 are [1, 2, 3, 100]: their median is 2.5; the slow warm-up steps never count.
    assert bench.steady_median([50.0, 40.0, 1.0, 2.0, 3.0, 100.0]) == 2.5
    assert bench.steady_median([9.0, 9.0, 4.0]) == 4.0
    with pytest.raises(ValueError, match="warm-up"):
        bench.steady_median([1.0, 2.0])


def test_run_order_interleaves_pairs_per_size(bench):
    order = bench.run_order(["a", "b"], pairs=2)
    assert order == [("a", "trl"), ("a", "rlhf_ray"), ("a", "trl"), ("a", "rlhf_ray"),
                     ("b", "trl"), ("b", "rlhf_ray"), ("b", "trl"), ("b", "rlhf_ray")]
    assert bench.run_order(["a"], pairs=0) == []


def test_generation_fraction_is_two_flops_per_param_per_token(bench):
    # 100M params at 100 tokens/s = 2e10 FLOP/s; against a 4e10 FLOP/s roof that is half.
    assert bench.generation_fraction(100_000_000, 100.0, 4e10) == pytest.approx(0.5)
    assert bench.generation_fraction(1_000, 0.0, 1e9) == 0.0


def test_ratio_goal_by_size(bench):
    assert bench.ratio_goal(102_000_000) == 0.5
    assert bench.ratio_goal(4_000_000) == 1.0
    assert bench.ratio_goal(526_848) == 1.0


def _run(side, median, startup, rate):
    return {"side": side, "step_median_s": median, "startup_s": startup, "process_s": startup + 5,
            "gen_tokens_per_s": rate}


def test_summarize_takes_medians_over_pairs(bench):
    runs = [_run("trl", 0.30, 10.0, 2000.0), _run("rlhf_ray", 0.20, 60.0, 1000.0),
            _run("trl", 0.26, 12.0, 2200.0), _run("rlhf_ray", 0.18, 50.0, 3000.0),
            _run("trl", 0.28, 11.0, 2100.0), _run("rlhf_ray", 0.90, 55.0, 2000.0)]
    row = bench.summarize("tiny", 500_000, runs, roof_flops=1e10)
    assert row["trl_step_s"] == pytest.approx(0.28)
    assert row["rlhf_ray_step_s"] == pytest.approx(0.20)  # the one slow run does not move the median
    assert row["ratio"] == pytest.approx(0.20 / 0.28)
    assert row["trl_startup_s"] == 11.0 and row["rlhf_ray_startup_s"] == 55.0
    assert row["rlhf_ray_gen_tok_s"] == 2000.0
    assert row["gen_fraction"] == pytest.approx(2 * 500_000 * 2000.0 / 1e10)
    assert row["roof_gflops"] == pytest.approx(10.0)
    assert row["ratio_goal"] == 1.0


def test_summarize_without_generation_rates_gives_nan(bench):
    runs = [{**_run("trl", 1.0, 1.0, None)}, {**_run("rlhf_ray", 1.0, 1.0, None)}]
    row = bench.summarize("tiny", 10, runs, roof_flops=1e9)
    assert math.isnan(row["rlhf_ray_gen_tok_s"]) and math.isnan(row["gen_fraction"])


def test_format_table_aligns_one_line_per_size(bench):
    row = {"size": "chatml-100m", "params": 102_000_000, "trl_step_s": 10.0, "rlhf_ray_step_s": 4.0,
           "ratio": 0.4, "ratio_goal": 0.5, "trl_startup_s": 30.0, "rlhf_ray_startup_s": 70.25,
           "trl_gen_tok_s": 150.0, "rlhf_ray_gen_tok_s": 250.4, "roof_gflops": 95.5, "gen_fraction": 0.536}
    small = {**row, "size": "tiny", "params": 526_848, "ratio_goal": 1.0}
    lines = bench.format_table([row, small]).splitlines()
    assert len(lines) == 4  # header, rule, two sizes
    assert len({len(line) for line in lines}) == 1  # every column right-aligned to one width
    assert lines[0].split()[:2] == ["size", "params"]
    cells = lines[2].split()
    assert cells[:6] == ["chatml-100m", "102,000,000", "10.000", "4.000", "0.40", "<=0.5"]
    assert cells[-3:] == ["250", "95.5", "53.6%"]
    assert "<=1.0" in lines[3]


def test_reward_is_the_same_on_both_sides(bench):
    assert bench.letter_share([], ["ab1 ", "", "xyz"], [{}, {}, {}]) == [0.5, 0.0, 1.0]
    completions = [[{"role": "assistant", "content": "ab1 "}], [{"role": "assistant", "content": "xyz"}]]
    assert bench.trl_reward(prompts=[], completions=completions) == [0.5, 1.0]
    assert bench.trl_reward(prompts=[], completions=["ab1 "]) == [0.5]


def test_prompts_are_fixed_and_distinct(bench):
    prompts = bench.make_prompts(64)
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert prompts == bench.make_prompts(64)


def test_rlhf_ray_config_is_the_benchmark_workload(bench, tmp_path):
    from rlhf_ray.config import RLHFConfig
    from rlhf_ray.config_loader import load_config

    cfg = load_config(RLHFConfig, None, bench.rlhf_overrides("tiny:tiny", tmp_path / "p.jsonl", tmp_path / "e.jsonl",
                                                             12, tmp_path, cpus=2))
    assert cfg.rollouts_per_step == 16 and cfg.generator.samples_per_prompt == 4
    assert cfg.generator.max_new_tokens == 32 and cfg.generator.ignore_eos
    assert cfg.algorithm.advantage == "grpo" and cfg.algorithm.kl_coef == 0
    assert cfg.learner.num_ranks == 1 and cfg.learner.micro_batch_size == 16 and cfg.learner.lr == bench.LR
    assert cfg.generator.placement.cpus == 2 and cfg.learner.placement.cpus == 2
    assert [f.path for f in cfg.reward.functions] == ["bench_vs_trl:letter_share"]
    assert cfg.run.max_steps == 12 and cfg.run.eval_every == 0 and not cfg.eval.at_start


def test_both_sides_see_the_same_prompt_tokens(bench, tmp_path, tiny_tokenizer):
    """rlhf_ray's prompt loader and TRL's rendering (apply_chat_template on the conversation, generation prompt
    on) give the same token ids for the benchmark's prompt file."""
    from rlhf_ray.data.prompts import load_prompts

    texts = bench.make_prompts(8)
    path = bench.write_prompts(tmp_path / "prompts.jsonl", texts)
    table, stats = load_prompts(str(path), tiny_tokenizer, max_prompt_length=256)
    assert stats["prompts"] == 8
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    trl_ids = tiny_tokenizer.apply_chat_template(conversation=[r["prompt"] for r in rows], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
    assert table.column("prompt_ids").to_pylist() == [list(ids) for ids in trl_ids]


def test_count_params_matches_the_loaded_model(bench, tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert bench.count_params(tiny_model_path) == sum(p.numel() for p in model.parameters())


def test_quick_is_one_pair_of_four_steps_at_the_smallest_size(bench):
    args = bench.parse_args(["--quick", "--sizes", "tiny,small"])
    assert (args.sizes, args.pairs, args.steps) == (["tiny"], 1, 4)
    assert bench.parse_args([]).sizes == list(bench.DEFAULT_SIZES)
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "2"])
