"""Where judgements go: an append-only log, and the reward-model file kept equal to its latest judgements.

- `judgements.jsonl`: every judgement ever made, one JSON line each (`judgements.make_record`), never
  rewritten. Changing an answer appends a new line; the latest line of an (annotator, item) wins.
- `feedback.jsonl`: the latest judgement of every (annotator, item) in the reward-model formats
  (`judgements.rm_rows`), in the order of those latest judgements: `rlhf-ray rm ...
  data.train=<output_dir>/feedback.jsonl` trains on it as is, at any moment, server running or not.

Every append holds an exclusive `fcntl.flock` on the log, first reads the lines other processes appended
since (so two servers on one directory stay consistent), writes its line with one `write` on an O_APPEND
descriptor, fsyncs, then brings the feedback file up to date, all under the lock: concurrent annotators,
threads or processes never interleave lines. The feedback file is not rewritten per judgement (at 100k
judgements that took about a second each): a first judgement of an (annotator, item) appends its rows; a
changed answer whose old rows end the file (the item just judged, or a tie / "both bad", which has none)
cuts them off and appends the new ones; only a change to an older answer that had rows rewrites the file
(from rows kept in memory, to a temporary file, then renamed, so a reader never sees half of it). Before
touching the file the store checks its size against the rows it should hold; a file out of step (a crash
between the two writes, a hand edit) is rewritten from the log. It is also rewritten at every start.

A crash can at worst leave a half-written last line in the log; it is skipped with a warning (the next
append starts a fresh line). After creating or renaming a file the directory is fsynced too, so the new
name survives a power cut.
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
from rlhf_ray.utils.durable import fsync_dir, replace_durably

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


def feedback_bytes(record: dict[str, Any]) -> bytes:
    """The feedback file's lines for one judgement (empty for a tie or "both bad")."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rm_rows(record)).encode("utf-8")


class JudgementStore:
    """The judgements of one output directory for one labeling mode."""

    def __init__(self, directory: str | os.PathLike, mode: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory / LOG_FILE
        self.feedback_path = self.directory / FEEDBACK_FILE
        self.mode = mode
        # Both in the order of each key's latest judgement, the feedback file's order (a changed key moves last).
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self._rows: dict[tuple[str, str], bytes] = {}  # feedback_bytes of each latest judgement
        self._feedback_size = 0  # len(b"".join(self._rows.values())): what the file should hold
        self._done: dict[str, set[str]] = {}  # annotator -> ids of the items judged
        self.total_lines = 0
        self.bad_lines = 0
        self.rewrites = 0  # full rewrites of the feedback file by this store (start included)
        self._offset = 0  # bytes of the log already read
        self._lock = threading.Lock()
        self._create(self.log_path)
        with self._locked() as fd:
            self._catch_up(fd)
            self._rewrite_feedback()

    def _create(self, path: Path) -> None:
        """Create `path` empty if it is missing, durably (the directory is fsynced)."""
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return
        fsync_dir(self.directory)

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
            self.latest, self._rows, self._feedback_size, self._done = {}, {}, 0, {}
            self.total_lines, self.bad_lines, self._offset = 0, 0, 0
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
        key = (record["annotator"], record["item_id"])
        self.latest.pop(key, None)
        self._feedback_size -= len(self._rows.pop(key, b""))
        self.latest[key] = record
        self._rows[key] = feedback_bytes(record)
        self._feedback_size += len(self._rows[key])
        self._done.setdefault(key[0], set()).add(key[1])

    def append(self, record: dict[str, Any]) -> None:
        """Log one judgement durably, then update the feedback file; returns when both are on disk."""
        if record["mode"] != self.mode:
            raise StoreError(f"a {record['mode']} judgement cannot go into a {self.mode} store")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        key = (record["annotator"], record["item_id"])
        with self._locked() as fd:
            if self._catch_up(fd):
                line = b"\n" + line  # end the half line a crash left, so it stays one unreadable line
            old = self._rows.get(key, b"")
            at_end = not old or next(reversed(self._rows)) == key  # are its old rows the file's tail?
            os.write(fd, line)
            os.fsync(fd)
            self._catch_up(fd)  # takes in this line (nobody else can append while the flock is held)
            self._update_feedback(old, self._rows[key], at_end)

    def _update_feedback(self, old: bytes, new: bytes, at_end: bool) -> None:
        """Replace the rows `old` of one judgement by `new`: cut and append when `old` ends the file,
        otherwise (or if the file is not what this store expects) rewrite it."""
        expected = self._feedback_size - len(new) + len(old)  # the file's size before this judgement
        fd = os.open(self.feedback_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if at_end and size == expected:
                if old:
                    os.ftruncate(fd, size - len(old))
                os.pwrite(fd, new, size - len(old))
                os.fsync(fd)
                return
        finally:
            os.close(fd)
        self._rewrite_feedback()

    def _rewrite_feedback(self) -> None:
        """Write the feedback file in full (temporary file, fsync, rename, fsync of the directory)."""
        replace_durably(self.feedback_path, b"".join(self._rows.values()))
        self.rewrites += 1

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
            return set(self._done.get(annotator, ()))
