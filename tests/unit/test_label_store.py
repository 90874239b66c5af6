"""The judgement store: append-only log, latest-only reward-model file, restarts, crashes, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from rlhf_ray.label.items import LabelItem
from rlhf_ray.label.judgements import make_record, rm_rows
from rlhf_ray.label.store import (
    FEEDBACK_FILE,
    LOG_FILE,
    JudgementStore,
    StoreError,
    latest_by_key,
    read_log,
)

ITEMS = [LabelItem(f"item{i}", f"prompt {i}", (f"good {i}", f"bad {i}")) for i in range(4)]


def pair(item: LabelItem, annotator: str, choice, order=(0, 1)) -> dict:
    return make_record(item, annotator, "pairwise", {"choice": choice}, list(order))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_changed_answers_are_appended_and_only_the_latest_is_trained_on(tmp_path):
    store = JudgementStore(tmp_path, "pairwise")
    store.append(pair(ITEMS[0], "alice", 0))
    store.append(pair(ITEMS[1], "alice", 0))
    store.append(pair(ITEMS[0], "bob", 1))
    store.append(pair(ITEMS[0], "alice", 1))      # alice changes her mind on item0
    store.append(pair(ITEMS[1], "alice", "tie"))  # and on item1: a tie is no pair
    log = lines(tmp_path / LOG_FILE)
    assert len(log) == 5 and [r["annotator"] for r in log] == ["alice", "alice", "bob", "alice", "alice"]
    feedback = lines(tmp_path / FEEDBACK_FILE)
    assert [(r["annotator"], r["item_id"], r["chosen"]) for r in feedback] == [  # in order of latest judgement
        ("bob", "item0", "bad 0"), ("alice", "item0", "bad 0")]
    assert set(feedback[0]) == {"prompt", "chosen", "rejected", "annotator", "timestamp", "item_id"}
    assert store.labeled_by("alice") == {"item0", "item1"} and store.labeled_by("bob") == {"item0"}
    assert store.judgement("alice", "item1")["verdict"] == "tie"
    assert store.judgement("carol", "item1") is None


def test_a_restarted_store_knows_everything_and_rebuilds_the_feedback_file(tmp_path):
    store = JudgementStore(tmp_path, "pairwise")
    for item in ITEMS[:3]:
        store.append(pair(item, "alice", 0))
    (tmp_path / FEEDBACK_FILE).unlink()  # e.g. a crash between the log append and the rewrite
    again = JudgementStore(tmp_path, "pairwise")
    assert again.labeled_by("alice") == {"item0", "item1", "item2"} and again.total_lines == 3
    assert len(lines(tmp_path / FEEDBACK_FILE)) == 3


def test_a_half_written_line_is_skipped_and_never_glued_to_the_next(tmp_path, capsys):
    store = JudgementStore(tmp_path, "pairwise")
    store.append(pair(ITEMS[0], "alice", 0))
    with open(tmp_path / LOG_FILE, "ab") as f:
        f.write(b'{"item_id": "item1", "annotator": "ali')  # a crash in the middle of a write
    again = JudgementStore(tmp_path, "pairwise")
    assert again.labeled_by("alice") == {"item0"}
    again.append(pair(ITEMS[2], "alice", 1))
    records, bad = read_log(tmp_path / LOG_FILE)
    assert [r["item_id"] for r in records] == ["item0", "item2"] and bad == 1
    assert again.bad_lines == 1 and "skipped an unreadable line" in capsys.readouterr().err
    assert JudgementStore(tmp_path, "pairwise").labeled_by("alice") == {"item0", "item2"}


def test_a_directory_of_another_mode_is_refused(tmp_path):
    JudgementStore(tmp_path, "pairwise").append(pair(ITEMS[0], "alice", 0))
    with pytest.raises(StoreError, match="holds pairwise judgements and this config's mode is rating; use another "
                                         "output_dir"):
        JudgementStore(tmp_path, "rating")


def test_two_stores_on_one_directory_see_each_others_judgements(tmp_path):
    first, second = JudgementStore(tmp_path, "pairwise"), JudgementStore(tmp_path, "pairwise")
    first.append(pair(ITEMS[0], "alice", 0))
    second.append(pair(ITEMS[1], "bob", 0))
    assert len(lines(tmp_path / FEEDBACK_FILE)) == 2  # the second read the first's line before rewriting
    first.refresh()
    assert first.labeled_by("bob") == {"item1"}


def _append_many(directory: str, annotator: str, n: int) -> None:
    store = JudgementStore(directory, "pairwise")
    big = LabelItem("x", "p", ("a" * 5000, "b" * 5000))  # long lines: a torn write would show
    for i in range(n):
        store.append(pair(LabelItem(f"{annotator}-{i}", big.prompt, big.responses), annotator, i % 2))


def test_concurrent_processes_never_interleave_lines(tmp_path):
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(str(tmp_path), f"annotator{w}", 15)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    records, bad = read_log(tmp_path / LOG_FILE)
    assert bad == 0 and len(records) == 60 and len({r["item_id"] for r in records}) == 60
    assert len(lines(tmp_path / FEEDBACK_FILE)) == 60


def expected_feedback(directory: Path) -> list[dict]:
    """The reward-model rows of the latest judgement of each (annotator, item), from the log alone."""
    latest = latest_by_key(read_log(directory / LOG_FILE)[0])
    return sorted((row for record in latest.values() for row in rm_rows(record)),
                  key=lambda row: (row["annotator"], row["item_id"]))


def by_key(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda row: (row["annotator"], row["item_id"]))


def test_new_judgements_append_to_the_feedback_file_and_never_rewrite_it(tmp_path):
    store = JudgementStore(tmp_path, "pairwise")
    feedback = tmp_path / FEEDBACK_FILE
    inode, rewrites = feedback.stat().st_ino, store.rewrites
    before = b""
    for i, item in enumerate(ITEMS * 2):
        store.append(pair(item, "alice" if i < 4 else "bob", i % 2))
        now = feedback.read_bytes()
        assert now.startswith(before) and len(now) > len(before)  # the old bytes stay, untouched
        before = now
    store.append(pair(ITEMS[3], "bob", 0))           # bob changes his last answer: its rows are cut and replaced
    assert lines(feedback)[-1]["chosen"] == "good 3" and feedback.read_bytes().startswith(before[:-200])
    store.append(pair(ITEMS[0], "carol", "tie"))     # a tie: no rows
    store.append(pair(ITEMS[0], "carol", 1))         # tie -> a pair: appended
    assert feedback.stat().st_ino == inode and store.rewrites == rewrites
    assert by_key(lines(feedback)) == expected_feedback(tmp_path) and len(lines(feedback)) == 9


def test_a_changed_older_answer_rewrites_the_feedback_file_to_exactly_the_latest(tmp_path):
    store = JudgementStore(tmp_path, "rating")

    def rate(item: LabelItem, who: str, scores: list[float]) -> dict:
        return make_record(item, who, "rating", {"scores": scores}, [0, 1])

    for item in ITEMS:
        store.append(rate(item, "alice", [5.0, 1.0]))
    rewrites = store.rewrites
    store.append(rate(ITEMS[1], "alice", [2.0, 4.0]))  # an older answer changed: its rows are in the middle
    assert store.rewrites == rewrites + 1
    rows = lines(tmp_path / FEEDBACK_FILE)
    assert by_key(rows) == expected_feedback(tmp_path) and len(rows) == 8
    assert [(r["item_id"], r["score"]) for r in rows[-2:]] == [("item1", 2.0), ("item1", 4.0)]
    assert JudgementStore(tmp_path, "rating").latest == store.latest  # what a restart reads agrees


def test_a_feedback_file_out_of_step_with_the_log_is_rewritten_from_the_log(tmp_path):
    store = JudgementStore(tmp_path, "pairwise")
    store.append(pair(ITEMS[0], "alice", 0))
    store.append(pair(ITEMS[1], "alice", 0))
    (tmp_path / FEEDBACK_FILE).write_text("")  # e.g. a crash between the log's write and the feedback's
    store.append(pair(ITEMS[2], "alice", 1))
    assert by_key(lines(tmp_path / FEEDBACK_FILE)) == expected_feedback(tmp_path) and store.rewrites == 2


def test_two_stores_appending_and_changing_answers_keep_the_feedback_exact(tmp_path):
    first, second = JudgementStore(tmp_path, "pairwise"), JudgementStore(tmp_path, "pairwise")
    for i in range(12):
        store = (first, second)[i % 2]
        store.append(pair(ITEMS[i % 4], ("alice", "bob")[i % 3 == 0], (0, 1, "tie")[i % 3]))
        assert by_key(lines(tmp_path / FEEDBACK_FILE)) == expected_feedback(tmp_path)


def test_the_directory_is_fsynced_after_files_are_created_or_renamed_into_it(tmp_path, monkeypatch):
    synced: list[os.stat_result] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.fstat(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = JudgementStore(tmp_path / "out", "pairwise")  # creates judgements.jsonl, renames feedback.jsonl
    directory = os.stat(tmp_path / "out")

    def dir_syncs() -> list[os.stat_result]:
        return [s for s in synced if stat.S_ISDIR(s.st_mode) and s.st_ino == directory.st_ino]

    assert len(dir_syncs()) == 2
    store.append(pair(ITEMS[0], "alice", 0))          # an append creates and renames nothing
    assert len(dir_syncs()) == 2 and len(synced) == 3 + 2  # but fsyncs the log and the feedback file
    store.append(pair(ITEMS[1], "alice", 0))
    store.append(pair(ITEMS[0], "alice", 1))          # an older answer changed: a rename, then the directory
    assert len(dir_syncs()) == 3
    synced.clear()
    JudgementStore(tmp_path / "out", "pairwise")      # the log exists already: only the feedback's rename
    assert len(dir_syncs()) == 1
