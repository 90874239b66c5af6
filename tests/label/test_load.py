"""8 annotators x 500 judgements at once against a real `rlhf-ray label` process on 127.0.0.1: nothing lost,
nothing duplicated, the reward-model file exactly the latest judgements. Latencies are printed, not asserted
(scripts/label_load_test.py runs the same with other sizes)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter

from rlhf_ray.label.store import FEEDBACK_FILE, LOG_FILE, read_log

from .conftest import REPO

ANNOTATORS, JUDGEMENTS = 8, 500


def load_script():
    spec = importlib.util.spec_from_file_location("label_load_test", REPO / "scripts" / "label_load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_concurrent_annotators_lose_and_duplicate_nothing(tmp_path, capsys):
    script = load_script()
    campaign = script.prepare(tmp_path, ANNOTATORS, JUDGEMENTS)
    port = script.free_port()
    server = script.start_server(campaign, port, tmp_path / "server.log")
    try:
        result = script.run_load(f"http://127.0.0.1:{port}", campaign.tokens, JUDGEMENTS, campaign.items)
    finally:
        assert script.stop_server(server) == 0, (tmp_path / "server.log").read_text()
    with capsys.disabled():
        print(f"\n[load] {result['requests']} judgements in {result['wall_s']:.1f} s ({result['throughput']:.0f}/s);"
              f" latency p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
    assert result["errors"] == [] and result["requests"] == ANNOTATORS * JUDGEMENTS

    records, bad = read_log(campaign.output_dir / LOG_FILE)
    assert bad == 0 and len(records) == ANNOTATORS * JUDGEMENTS == 4000
    per_key = Counter((r["annotator"], r["item_id"]) for r in records)
    assert len(per_key) == 4000 and set(per_key.values()) == {1}  # one per (annotator, item)
    assert Counter(r["annotator"] for r in records) == {name: JUDGEMENTS for name in campaign.tokens}
    # Choices cycle 0, 1, tie, both bad: half the judgements are preferences, each one row.
    feedback = [json.loads(line) for line in (campaign.output_dir / FEEDBACK_FILE).read_text().splitlines()]
    assert len(feedback) == 2000 and len({(r["annotator"], r["item_id"]) for r in feedback}) == 2000
    assert script.check_output(campaign, JUDGEMENTS) == []
