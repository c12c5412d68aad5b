"""The one base class of every error a user can fix.

Each subclass's message names the setting, file or input to change. The CLI catches `LlmtuneError` once
(`run.py`), prints the message as one paragraph and exits with code 2, whether the error was found before
the pipeline ran or inside a step; anything else is a bug and keeps its traceback. A step's error reaches
the CLI through a file (`leave_for_cli`, from the pipelines' failure hook), because the orchestrator
re-raises a failed step as its own RuntimeError.

Example:
    >>> from llmtune.config import ConfigError
    >>> issubclass(ConfigError, LlmtuneError), str(ConfigError("Unknown key 'x'"))
    (True, "Unknown key 'x'")
"""

from __future__ import annotations

import os
from pathlib import Path

# Set by the CLI to a file where a failed step leaves the LlmtuneError that stopped it.
ERROR_FILE_ENV = "LLMTUNE_ERROR_FILE"


class LlmtuneError(Exception):
    """A problem the user can fix; the message says what to change."""


def leave_for_cli(err: BaseException) -> None:
    """Write a user-fixable error where the CLI that started this run reads it (nothing for other errors, or
    when no CLI asked for it).

    >>> import tempfile; path = tempfile.mktemp()
    >>> os.environ[ERROR_FILE_ENV] = path
    >>> leave_for_cli(LlmtuneError("rows.jsonl, line 3: bad")); left_for_cli()
    'rows.jsonl, line 3: bad'
    >>> leave_for_cli(KeyError("a bug")); left_for_cli()  # only errors the user can fix are passed on
    'rows.jsonl, line 3: bad'
    >>> del os.environ[ERROR_FILE_ENV]
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if path and isinstance(err, LlmtuneError):
        Path(path).write_text(str(err), encoding="utf-8")


def left_for_cli() -> str | None:
    """The message of the LlmtuneError a step left (see `leave_for_cli`), if any."""
    path = Path(os.environ.get(ERROR_FILE_ENV) or "")
    return path.read_text(encoding="utf-8") if path.name and path.is_file() else None
