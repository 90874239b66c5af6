"""Files that survive a kill at any instant: fsync of files and directories, atomic replacement, and the
rewind of a metrics file to the checkpoint a run resumes from.

A rename is atomic but only durable once its directory is fsynced, and a file's data is only durable once the
file is fsynced: without both, a power loss after "checkpoint committed" can leave a renamed directory with
empty files in it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (creations, renames, deletions) durable: fsyncing a file makes its
    bytes durable, not its name."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root` (written by any process: fsync flushes the file, not one descriptor),
    then every directory bottom-up, `root` last."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_json_durably(path: Path, data: Any) -> None:
    replace_durably(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def replace_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: a temp file (named for this process and thread, so that writers
    in several of them never share one), fsynced, renamed over it, the directory fsynced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rewind_metrics(path: Path, step: Optional[int]) -> int:
    """Drop the records of metrics file `path` logged after `step` (None: all of them), and a last line cut
    short by a kill, so that a run resumed from checkpoint `step` logs each later step once. Rewritten
    atomically (a kill now leaves the old file or the new one). Returns how many records were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # only the last line can be cut short (each record is one write + flush)
            dropped += 1
            continue
        if step is not None and record.get("step", 0) <= step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        replace_durably(path, "".join(line + "\n" for line in keep).encode("utf-8"))
        why = (f"logged after step {step}, the checkpoint resumed from" if step is not None
               else "of an earlier start that left no checkpoint")
        tqdm.write(f"[run] {path}: dropped {dropped} records {why}; this run logs those steps again")
    return dropped
