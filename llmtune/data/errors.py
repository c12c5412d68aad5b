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

from llmtune.errors import LlmtuneError


class DataError(LlmtuneError, ValueError):
    """Input data that cannot be used; the message names the file, row or line, and field."""


class ErrorLog:
    """Applies `data.on_error` to bad rows: 'raise' stops at the first one, 'skip' counts them and keeps a few."""

    KEEP = 5

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.count = 0
        self.first: list[str] = []
        self.split = 0  # conversations trained as one sequence per answer (see `encode.encode_kept`)
        self.first_split: str | None = None

    def bad(self, message: str) -> None:
        """Report one unusable row: raise DataError, or count it and remember the first few messages."""
        if self.policy == "raise":
            raise DataError(message)
        self.count += 1
        if len(self.first) < self.KEEP:
            self.first.append(message)

    def note_split(self, message: str) -> None:
        """Count a conversation split into one sequence per answer, keeping the first reason."""
        self.split += 1
        self.first_split = self.first_split or message
