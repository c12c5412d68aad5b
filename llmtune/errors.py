"""The one base class of every error a user can fix.

Each subclass's message names the setting, file or input to change. The CLI catches `LlmtuneError` once
(`run.py`), prints the message as one paragraph and exits with code 2, whether the error was found before
the pipeline ran or inside a step; anything else is a bug and keeps its traceback.

Example:
    >>> from llmtune.config import ConfigError
    >>> issubclass(ConfigError, LlmtuneError), str(ConfigError("Unknown key 'x'"))
    (True, "Unknown key 'x'")
"""

from __future__ import annotations


class LlmtuneError(Exception):
    """A problem the user can fix; the message says what to change."""
