"""Load test of the labeling server: concurrent annotators judging over HTTP against a real `rlhf-ray label`.

    python scripts/label_load_test.py [--annotators 8] [--judgements 500] [--logged 0] [--output-dir DIR]

Writes a pairwise candidates file of `--judgements` items and a config naming `--annotators` annotators, starts
`rlhf-ray label` as its own process on a free 127.0.0.1 port, and runs one thread per annotator, each posting a
judgement of every item (its own order, choices cycling through the first response, the second, a tie and
"both bad") over one keep-alive connection, each request timed from send to reply. `--logged N` first fills
the log with N judgements of other items (by an annotator `earlier`), to measure a long campaign. Then it
stops the server (SIGINT: a clean uvicorn shutdown) and checks the output directory: the log holds every
judgement exactly once and no broken line, and `feedback.jsonl` is exactly the reward-model rows of the latest
judgement of each (annotator, item). Prints p50 / p95 / p99 latency, throughput and the check; exits 1 if the
check fails. tests/label/test_load.py runs the same functions.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhf_ray.label.items import LabelItem
from rlhf_ray.label.judgements import make_record, rm_rows
from rlhf_ray.label.store import FEEDBACK_FILE, LOG_FILE, latest_by_key, read_log

CHOICES = (0, 1, "tie", "both_bad")


@dataclass
class Campaign:
    """The files of one load test: config, candidates, tokens (annotator -> token), output directory."""

    config: Path
    output_dir: Path
    tokens: dict[str, str]
    items: int
    logged: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path, annotators: int, items: int, logged: int = 0) -> Campaign:
    """Candidates, tokens and config under `work`; the log pre-filled with `logged` earlier judgements."""
    work.mkdir(parents=True, exist_ok=True)
    candidates = work / "candidates.jsonl"
    rows = ({"prompt": f"Sort the letters: load{i}", "responses": [f"answer a {i}", f"answer b {i}"]}
            for i in range(items))
    with open(candidates, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    tokens = {f"annotator{a}": secrets.token_urlsafe(18) for a in range(annotators)}
    output_dir = work / "out"
    config = work / "label.yaml"
    config.write_text(yaml.safe_dump({"mode": "pairwise", "candidates": str(candidates),
                                      "output_dir": str(output_dir), "server": {"annotators": tokens}}))
    if logged:
        output_dir.mkdir(parents=True, exist_ok=True)
        earlier = (LabelItem(f"earlier{i:07d}", f"an earlier prompt {i}", (f"earlier a {i}", f"earlier b {i}"))
                   for i in range(logged))
        with open(output_dir / LOG_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(make_record(item, "earlier", "pairwise", {"choice": i % 2}, [0, 1])) + "\n"
                         for i, item in enumerate(earlier))
    return Campaign(config, output_dir, tokens, items, logged)


def start_server(campaign: Campaign, port: int, log: Path, timeout: float = 300) -> subprocess.Popen:
    """`rlhf-ray label` in its own process; returns once it answers (a pre-filled log takes a while to read)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_ray.cli", "label", str(campaign.config),
                                 f"server.port={port}"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    token = next(iter(campaign.tokens.values()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rlhf-ray label exited with {proc.returncode}:\n{log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/state", headers={"Authorization": f"Bearer {token}"},
                      timeout=5).raise_for_status()
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError(f"rlhf-ray label did not answer within {timeout:.0f} s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGINT (uvicorn's clean shutdown), then SIGKILL if it is still there after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


def annotate(base: str, token: str, offset: int, judgements: int, latencies: list[float],
             errors: list[str]) -> None:
    """One annotator: `judgements` items from position `offset` on (wrapping), one POST each, timed."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        ids = [flag["id"] for flag in client.get("/api/state").raise_for_status().json()["items"]]
        for i in range(judgements):
            item = ids[(offset + i) % len(ids)]
            started = time.perf_counter()
            response = client.post(f"/api/items/{item}/judgement", json={"choice": CHOICES[i % len(CHOICES)]})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                errors.append(f"{item}: {response.status_code} {response.text[:200]}")


def run_load(base: str, tokens: dict[str, str], judgements: int, items: int) -> dict[str, Any]:
    """Every annotator in its own thread at once; latency percentiles (ms) and throughput (judgements/s)."""
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=annotate, args=(base, token, a * items // len(tokens), judgements,
                                                        latencies, errors))
               for a, token in enumerate(tokens.values())]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")

    return {"requests": len(latencies), "errors": errors, "wall_s": wall, "throughput": len(latencies) / wall,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": 1000 * ordered[-1]}


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    return row["annotator"], row["item_id"]


def check_output(campaign: Campaign, judgements: int) -> list[str]:
    """What is wrong with the output directory after the load (empty: nothing)."""
    problems = []
    records, bad = read_log(campaign.output_dir / LOG_FILE)
    new = [r for r in records if r["annotator"] != "earlier"]
    if bad:
        problems.append(f"{LOG_FILE}: {bad} unreadable lines")
    expected = len(campaign.tokens) * judgements
    if len(new) != expected or len(records) != expected + campaign.logged:
        problems.append(f"{LOG_FILE}: {len(new)} new judgements, expected {expected}; "
                        f"{len(records)} in all, expected {expected + campaign.logged}")
    twice = [k for k, n in Counter((r["annotator"], r["item_id"]) for r in new).items() if n > 1]
    if twice and judgements <= campaign.items:
        problems.append(f"{LOG_FILE}: {len(twice)} (annotator, item) judged twice, e.g. {twice[0]}")
    latest = latest_by_key(records).values()
    want = sorted((row for record in latest for row in rm_rows(record)), key=row_key)
    with open(campaign.output_dir / FEEDBACK_FILE, encoding="utf-8") as f:
        have = sorted((json.loads(line) for line in f), key=row_key)
    if have != want:
        problems.append(f"{FEEDBACK_FILE}: {len(have)} rows, expected the {len(want)} rows of the latest judgements")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--judgements", type=int, default=500, help="per annotator, each on its own item")
    parser.add_argument("--logged", type=int, default=0, help="judgements already in the log at start")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    work = args.output_dir or Path(tempfile.mkdtemp(prefix="label-load-"))
    campaign = prepare(work, args.annotators, args.judgements, args.logged)
    port = free_port()
    proc = start_server(campaign, port, work / "server.log")
    try:
        result = run_load(f"http://127.0.0.1:{port}", campaign.tokens, args.judgements, campaign.items)
    finally:
        code = stop_server(proc)
    problems = result["errors"][:5] + check_output(campaign, args.judgements)
    print(f"[load] {args.annotators} annotators x {args.judgements} judgements ({args.logged} logged before), "
          f"server pid {proc.pid} exit {code}, output in {work}")
    print(f"[load] {result['requests']} requests in {result['wall_s']:.1f} s: {result['throughput']:.0f} "
          f"judgements/s; latency p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms")
    print("[load] check: " + ("ok: every judgement logged once, feedback = latest judgements" if not problems
                              else "FAILED: " + "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
