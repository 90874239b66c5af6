"""Errors in user data, worded for the person who has to fix the file: where, which field, what is wrong."""

from __future__ import annotations

from typing import ClassVar


def location_word(source: str) -> str:
    """"line" for .jsonl files (rows are 1-based line numbers), "row" for everything else (0-based)."""
    return "line" if source.lower().endswith(".jsonl") else "row"


class DataError(ValueError):
    """A problem in a data source, located by source, line or row, and field.

    `row` is the 1-based line number in a .jsonl file and the 0-based row index in any other source, and
    `str()` says which: `data/train.jsonl, line 7, field 'output': must be a non-empty string`. `detail`
    (optional) is the specific value or parser message, shown in parentheses; it is left out of `reason`,
    so skipped rows with the same problem are counted together.
    """

    skippable: ClassVar[bool] = True
    """Whether `data.skip_invalid` may skip the row instead of stopping."""

    def __init__(self, source: str, message: str, row: int | None = None, field: str | None = None,
                 detail: str | None = None):
        self.source = source
        self.message = message
        self.row = row
        self.field = field
        self.detail = detail
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = [self.source]
        if self.row is not None:
            where.append(f"{location_word(self.source)} {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        text = f"{', '.join(where)}: {self.message}"
        return f"{text} ({self.detail})" if self.detail else text

    @property
    def reason(self) -> str:
        """The problem without its location or detail, e.g. "field 'output': must be a non-empty string"."""
        return f"field '{self.field}': {self.message}" if self.field is not None else self.message

    def __reduce__(self):
        # Exceptions pickle as cls(*args); ours has a different signature (Ray pickles errors across actors).
        return type(self), (self.source, self.message, self.row, self.field, self.detail)


class ChatTemplateError(DataError):
    """The tokenizer's chat template cannot be used to build the loss mask.

    Never skipped by `data.skip_invalid`: it is a property of the template, so it would drop every row.
    """

    skippable = False
