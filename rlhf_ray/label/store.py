"""Where judgements go: an append-only log, and the reward-model file rebuilt from it after every judgement.

- `judgements.jsonl`: every judgement ever made, one JSON line each (`judgements.make_record`), never
  rewritten. Changing an answer appends a new line; the latest line of an (annotator, item) wins.
- `feedback.jsonl`: the latest judgement of every (annotator, item) in the reward-model formats
  (`judgements.rm_rows`): `rlhf-ray rm ... data.train=<output_dir>/feedback.jsonl` trains on it as is.
  It is written to a temporary file and renamed, so a reader never sees half of it.

Every append holds an exclusive `fcntl.flock` on the log, first reads the lines other processes appended
since (so two servers on one directory stay consistent), writes its line with one `write` on an O_APPEND
descriptor, fsyncs, then rewrites the feedback file, all under the lock: concurrent annotators, threads or
processes never interleave lines. A crash can at worst leave a half-written last line; it is skipped with a
warning (the next append starts a fresh line), and the feedback file is rebuilt from the log at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from rlhf_ray.config_loader import ConfigError
from rlhf_ray.label.judgements import rm_rows

LOG_FILE = "judgements.jsonl"
FEEDBACK_FILE = "feedback.jsonl"
_REQUIRED = ("item_id", "annotator", "mode", "timestamp")


class StoreError(ConfigError):
    """The output directory cannot take this config's judgements (e.g. it holds another mode's)."""


def parse_log_line(raw: bytes) -> Optional[dict[str, Any]]:
    """The record of one log line, or None if it is not a judgement (a half-written line after a crash)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or any(not isinstance(record.get(k), str) for k in _REQUIRED):
        return None
    return record


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(every judgement in file order, number of unreadable lines) of a log file."""
    records, bad = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            record = parse_log_line(raw)
            if record is None:
                bad += 1
            else:
                records.append(record)
    return records, bad


def latest_by_key(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The last record of every (annotator, item_id), in order of each key's first judgement."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        latest[(record["annotator"], record["item_id"])] = record
    return latest


class JudgementStore:
    """The judgements of one output directory for one labeling mode."""

    def __init__(self, directory: str | os.PathLike, mode: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / LOG_FILE
        self.feedback_path = self.directory / FEEDBACK_FILE
        self.mode = mode
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.total_lines = 0
        self.bad_lines = 0
        self._offset = 0  # bytes of the log already read
        self._lock = threading.Lock()
        with self._locked() as fd:
            self._catch_up(fd)
            self._write_feedback()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """This process's lock, then the log's exclusive flock; yields an O_APPEND descriptor of the log."""
        with self._lock:
            fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)  # closing releases the flock

    def _catch_up(self, fd: int) -> bool:
        """Read the complete lines appended since the last call; True if a partial line is left at the end."""
        size = os.fstat(fd).st_size
        if size < self._offset:  # the log was replaced or cut by hand: read it again
            self.latest, self.total_lines, self.bad_lines, self._offset = {}, 0, 0, 0
        data = os.pread(fd, size - self._offset, self._offset)
        end = data.rfind(b"\n") + 1
        for raw in data[:end].splitlines():
            if raw.strip():
                self._apply(parse_log_line(raw))
        self._offset += end
        return end < len(data)

    def _apply(self, record: Optional[dict[str, Any]]) -> None:
        if record is None:
            self.bad_lines += 1
            print(f"[label] warning: {self.log_path}: skipped an unreadable line (a write cut short?)",
                  file=sys.stderr)
            return
        if record["mode"] != self.mode:
            raise StoreError(f"{self.log_path} holds {record['mode']} judgements and this config's mode is "
                             f"{self.mode}; use another output_dir")
        self.total_lines += 1
        self.latest[(record["annotator"], record["item_id"])] = record

    def append(self, record: dict[str, Any]) -> None:
        """Log one judgement durably, then rewrite the feedback file; returns when both are on disk."""
        if record["mode"] != self.mode:
            raise StoreError(f"a {record['mode']} judgement cannot go into a {self.mode} store")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._locked() as fd:
            if self._catch_up(fd):
                line = b"\n" + line  # end the half line a crash left, so it stays one unreadable line
            os.write(fd, line)
            os.fsync(fd)
            self._catch_up(fd)
            self._write_feedback()

    def _write_feedback(self) -> None:
        rows = [row for record in self.latest.values() for row in rm_rows(record)]
        tmp = self.feedback_path.with_name(f".{FEEDBACK_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.feedback_path)

    def refresh(self) -> None:
        """Take in what other processes appended (reads only)."""
        with self._locked() as fd:
            self._catch_up(fd)

    def judgement(self, annotator: str, item_id: str) -> Optional[dict[str, Any]]:
        """The annotator's latest judgement of the item, or None."""
        with self._lock:
            return self.latest.get((annotator, item_id))

    def labeled_by(self, annotator: str) -> set[str]:
        """Ids of the items the annotator has judged."""
        with self._lock:
            return {item for who, item in self.latest if who == annotator}
