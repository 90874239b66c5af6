"""Rows from any data source the configs accept, each located so that errors can name it.

Sources: a .jsonl file (one JSON object per line), a .json file (a list of objects), a .parquet file, a
directory written by `datasets.save_to_disk`, or anything else `datasets.load_dataset` can open (a hub
name, a directory of data files). A row that cannot be read as an object (an unparseable line, a value
that is not an object) is yielded as a `Record` holding a `DataError` rather than raised, so that
`collect_valid` decides, from `data.skip_invalid`, whether to stop or to skip and count it. Problems with
the source as a whole (missing file, unreadable .json) are raised at once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal, TypeVar

from rlhf_ray.data.errors import DataError

T = TypeVar("T")

FILE_TYPES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Record:
    """One row of a source: a 1-based line number (kind "line", .jsonl) or a 0-based row index ("row")."""

    source: str
    index: int
    kind: Literal["line", "row"]
    value: Any
    """The row as a dict, or the `DataError` saying why it could not be read as one."""

    def error(self, message: str, field: str | None = None, detail: str | None = None) -> DataError:
        """A `DataError` located at this record."""
        return DataError(self.source, message, row=self.index, field=field, detail=detail)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _record(source: str, index: int, kind: Literal["line", "row"], value: Any) -> Record:
    """A record whose value is a dict or a DataError (anything else becomes one)."""
    if not isinstance(value, (dict, DataError)):
        value = DataError(source, "expected a JSON object", row=index, detail=f"got {_type_name(value)}")
    return Record(source, index, kind, value)


def _parse_line(source: str, lineno: int, raw: bytes) -> Any:
    """The JSON value of one .jsonl line, None for a blank line, or a DataError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return DataError(source, "is not valid UTF-8", row=lineno, detail=str(err))
    if lineno == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return DataError(source, "not valid JSON", row=lineno, detail=f"column {err.colno}: {err.msg}")


def _read_jsonl(path: Path, source: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            value = _parse_line(source, lineno, raw)
            if value is not None:
                yield _record(source, lineno, "line", value)


def _read_json(path: Path, source: str) -> Iterator[Record]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(source, "not a valid JSON file", detail=str(err)) from err
    if not isinstance(rows, list):
        raise DataError(source, "a .json data file must hold a list of objects (use .jsonl for one per line)",
                        detail=f"got {_type_name(rows)}")
    return (_record(source, i, "row", row) for i, row in enumerate(rows))


def _read_parquet(path: Path, source: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(source, "not a readable Parquet file", detail=str(err)) from err
    rows = (row for batch in table.iter_batches() for row in batch.to_pylist())
    return (_record(source, i, "row", row) for i, row in enumerate(rows))


_FILE_READERS: dict[str, Callable[[Path, str], Iterator[Record]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
}


def _is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_saved(path: Path, source: str, split: str) -> Any:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(source, f"has no split {split!r}; set data.split",
                            detail=f"available: {', '.join(data)}")
        data = data[split]
    return data


def _load_named(source: str, split: str) -> Any:
    path = Path(source)
    if not path.exists() and (path.is_absolute() or source.startswith(".")):
        raise DataError(source, "no such file or directory")
    from datasets import load_dataset

    try:
        return load_dataset(source, split=split)
    except Exception as err:  # datasets raises many unrelated types for "cannot open this"
        raise DataError(source, "is neither a .jsonl/.json/.parquet file nor a dataset that "
                                "`datasets.load_dataset` can open",
                        detail=f"{type(err).__name__}: {err}") from err


def read_records(source: str, split: str = "train") -> Iterator[Record]:
    """The rows of `source` (a file, a saved dataset directory or a `datasets` name), in order.

    `split` picks the split of a `DatasetDict` or of a `load_dataset` dataset; files have no splits.
    Raises DataError at once when the source itself cannot be opened.
    """
    path = Path(source)
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is not None:
        if not path.is_file():
            raise DataError(source, "file not found" if not path.exists() else "is not a file")
        return reader(path, source)
    if path.is_file():
        raise DataError(source, f"unsupported file type {path.suffix!r}",
                        detail=f"use {', '.join(FILE_TYPES)}")
    data = _load_saved(path, source, split) if _is_saved_dataset(path) else _load_named(source, split)
    return (_record(source, i, "row", row) for i, row in enumerate(data))


def _nothing_valid(source: str, skipped: Counter[str]) -> DataError:
    if not skipped:
        return DataError(source, "dataset is empty: no rows found")
    common = "; ".join(f"{reason} (x{n})" for reason, n in skipped.most_common(3))
    return DataError(source, "no valid rows; set data.skip_invalid=false to stop at the first bad row",
                     detail=f"{sum(skipped.values())} rows skipped: {common}")


def collect_valid(records: Iterable[Record], validate: Callable[[Record], T], skip_invalid: bool,
                  source: str | None = None) -> tuple[list[T], Counter[str]]:
    """`validate(record)` for every record, with the rows skipped counted by reason.

    `validate` raises DataError for a bad row, as do unreadable records. With `skip_invalid` the row is
    counted under `DataError.reason` instead (unless the error is not `skippable`). Raises DataError when
    no valid row remains; `source` names the data in that message when there were no records at all.
    """
    valid: list[T] = []
    skipped: Counter[str] = Counter()
    for record in records:
        source = record.source
        try:
            if isinstance(record.value, DataError):
                raise record.value
            valid.append(validate(record))
        except DataError as err:
            if not (skip_invalid and err.skippable):
                raise
            skipped[err.reason] += 1
    if not valid:
        raise _nothing_valid(source or "<data>", skipped)
    return valid, skipped


def detect_format(fmt: str, records: Iterable[Record], guess: Callable[[dict], str],
                  default: str) -> tuple[str, Iterator[Record]]:
    """`fmt`, or for "auto" `guess(first readable row)` (`default` if there is none); plus all the records."""
    records = iter(records)
    if fmt != "auto":
        return fmt, records
    head: list[Record] = []
    for record in records:
        head.append(record)
        if isinstance(record.value, dict):
            return guess(record.value), chain(head, records)
    return default, iter(head)
