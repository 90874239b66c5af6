"""The GPU tier's one table, from the JSON lines the tests append (one record per configuration).

    python tests/gpu/gpu_table.py RESULTS.jsonl [--markdown OUT.md]

A record is `{"config": name, ...figures}`, or `{"config": name, "error": text}` for a run that failed before
it produced figures; the last record of a configuration wins. Plain Python: no torch, Ray or vLLM import.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# (header, record key)
COLUMNS = [
    ("config", "config"), ("sync", "transport"), ("steps", "steps"), ("step s", "step_s"),
    ("gen tok/s", "gen_tok_s"), ("train tok/s", "train_tok_s"), ("sync s", "sync_s"), ("checksum", "checksum"),
    ("gap max", "gap_max"), ("gap mean", "gap_mean"), ("gap step 1", "gap_first_max"), ("run s", "wall_s"),
]


def load(path: str | Path) -> list[dict[str, Any]]:
    """Records of `path` in first-seen order of their config, the last record of each config kept."""
    by_config: dict[str, dict[str, Any]] = {}
    file = Path(path)
    if not file.exists():
        return []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{number}: not a JSON record ({err})") from None
        by_config[str(record.get("config", f"row {number}"))] = record
    return list(by_config.values())


def cell(value: Any) -> str:
    """Numbers at a precision that reads in a table; absent values as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")


def render(records: list[dict[str, Any]], title: str | None = None) -> str:
    """A Markdown table, one row per record, plus a line per failed configuration."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(h for h, _ in COLUMNS) + " |")
    lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
    failures = []
    for record in records:
        if "error" in record:
            failures.append(f"- {record.get('config')}: FAILED: {cell(record['error'])[:300]}")
            row = [cell(record.get("config"))] + ["FAILED"] + ["-"] * (len(COLUMNS) - 2)
        else:
            row = [cell(record.get(key)) for _, key in COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    if not records:
        lines.append("| (no results: no test ran to the point of recording) |" + " |" * (len(COLUMNS) - 1))
    notes = [f"- {r['config']}: {cell(r['note'])}" for r in records if r.get("note")]
    if failures or notes:
        lines += [""] + failures + notes
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="JSON lines written by tests/gpu (RLHF_RAY_GPU_REPORT)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--title", default=None, help="a heading above the table")
    args = parser.parse_args(argv)
    table = render(load(args.results), args.title)
    sys.stdout.write(table)
    if args.markdown:
        Path(args.markdown).write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
