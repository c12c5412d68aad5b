"""Data problems and the `data.on_error` policy.

Example:
    >>> log = ErrorLog("skip")
    >>> log.bad("rows.jsonl, line 3: malformed JSON")
    >>> log.count, log.first
    (1, ['rows.jsonl, line 3: malformed JSON'])
    >>> ErrorLog("raise").bad("rows.jsonl, line 3: malformed JSON")
    Traceback (most recent call last):
    ...
    llmtune.data.errors.DataError: rows.jsonl, line 3: malformed JSON
"""

from __future__ import annotations

import os
from pathlib import Path

# Set by the CLI to a file where a pipeline step leaves the DataError that stopped it: the orchestrator
# re-raises a step failure as its own RuntimeError, and the user should see the data problem instead.
ERROR_FILE_ENV = "LLMTUNE_DATA_ERROR_FILE"


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, row or line, and field."""


class ErrorLog:
    """Applies `data.on_error` to bad rows: 'raise' stops at the first one, 'skip' counts them and keeps a few."""

    KEEP = 5

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.count = 0
        self.first: list[str] = []

    def bad(self, message: str) -> None:
        """Report one unusable row: raise DataError, or count it and remember the first few messages."""
        if self.policy == "raise":
            raise DataError(message)
        self.count += 1
        if len(self.first) < self.KEEP:
            self.first.append(message)


def leave_for_cli(err: DataError) -> None:
    """Write the error where the CLI that started this run reads it (nothing when no CLI asked for it).

    >>> import tempfile; path = tempfile.mktemp()
    >>> os.environ[ERROR_FILE_ENV] = path
    >>> leave_for_cli(DataError("rows.jsonl, line 3: bad")); left_for_cli()
    'rows.jsonl, line 3: bad'
    >>> del os.environ[ERROR_FILE_ENV]
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        Path(path).write_text(str(err), encoding="utf-8")


def left_for_cli() -> str | None:
    """The DataError message a step left (see `leave_for_cli`), if any."""
    path = Path(os.environ.get(ERROR_FILE_ENV) or "")
    return path.read_text(encoding="utf-8") if path.name and path.is_file() else None
