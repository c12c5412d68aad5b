"""Row formats (alpaca, sharegpt, messages, text) turned into one `Example` form, with format detection.

Column names can be remapped (`data.columns`) and role names extended (`data.role_map`); every
problem names the row and the field.

Example:
    >>> ex = to_example({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca", "row 1")
    >>> ex.turns
    (('user', 'Add\\n\\n1 2'), ('assistant', '3'))
    >>> detect_format({"conversations": [{"from": "human", "value": "hi"}]})
    'sharegpt'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmtune.data.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "text")
ROLES = ("system", "user", "assistant")
# Role names seen in the wild (ShareGPT exports, OpenAI logs, Gemini data) mapped to the three chat roles.
DEFAULT_ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "bot": "assistant",
}


@dataclass(frozen=True)
class Example:
    """One training example: chat turns (role, content), or plain text for completion training."""

    turns: tuple[tuple[str, str], ...] = ()
    text: str | None = None

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.turns]

    def is_empty(self) -> bool:
        """Nothing to learn from: blank text, or no assistant turn with content."""
        if self.text is not None:
            return not self.text.strip()
        return not any(role == "assistant" and content.strip() for role, content in self.turns)


def detect_format(row: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> str:
    """The format of a row from its columns (after `columns` remapping); DataError if none fits."""
    name = _column_namer(columns or {})
    if name("messages") in row:
        return "messages"
    if name("conversations") in row:
        return "sharegpt"
    if name("instruction") in row or name("output") in row:  # a partial Alpaca row then fails on its missing field
        return "alpaca"
    if name("text") in row:
        return "text"
    raise DataError(
        f"Cannot tell the data format from the columns {sorted(row)}. Expected one of: messages "
        f"(role/content turns), conversations (ShareGPT from/value turns), instruction+output (Alpaca), text. "
        f"Set data.format, and map your column names with data.columns, e.g. {{instruction: question, "
        f"output: answer}}."
    )


def to_example(
    row: Mapping[str, Any],
    fmt: str,
    where: str,
    columns: Mapping[str, str] | None = None,
    role_map: Mapping[str, str] | None = None,
) -> Example:
    """Convert one row of format `fmt`; raises DataError naming `where` and the field."""
    name = _column_namer(columns or {})
    if fmt == "alpaca":
        return _from_alpaca(row, where, name)
    if fmt == "text":
        return Example(text=_string_field(row, name("text"), where, required=True))
    if fmt in ("sharegpt", "messages"):
        list_column = name("conversations" if fmt == "sharegpt" else "messages")
        roles = {**DEFAULT_ROLE_NAMES, **(role_map or {})}
        return Example(turns=_turns(row, list_column, where, name, roles))
    raise DataError(f"Unknown data.format '{fmt}'; use auto or one of {', '.join(FORMATS)}.")


def _column_namer(columns: Mapping[str, str]) -> Any:
    return lambda field: columns.get(field, field)


def _string_field(row: Mapping[str, Any], column: str, where: str, required: bool) -> str:
    if column not in row or row[column] is None:
        if required:
            raise DataError(f"{where}: missing field '{column}' (columns present: {', '.join(sorted(row))}).")
        return ""
    value = row[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' must be a string, got {type(value).__name__}.")
    return value


def _from_alpaca(row: Mapping[str, Any], where: str, name: Any) -> Example:
    instruction = _string_field(row, name("instruction"), where, required=True).strip()
    extra_input = _string_field(row, name("input"), where, required=False).strip()
    output = _string_field(row, name("output"), where, required=True).strip()
    system = _string_field(row, name("system"), where, required=False).strip()
    prompt = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    turns = ((("system", system),) if system else ()) + (("user", prompt), ("assistant", output))
    return Example(turns=turns)


def _turns(
    row: Mapping[str, Any], column: str, where: str, name: Any, roles: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    if column not in row or row[column] is None:
        raise DataError(f"{where}: missing field '{column}' (columns present: {', '.join(sorted(row))}).")
    turns = row[column]
    if isinstance(turns, str):  # CSV cells and some exports hold the conversation as a JSON string
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field '{column}' is a string that is not a JSON list of turns.") from None
    if not isinstance(turns, list):
        raise DataError(f"{where}: field '{column}' must be a list of turns, got {type(turns).__name__}.")
    if not turns:
        raise DataError(f"{where}: field '{column}' is an empty conversation.")
    return tuple(_turn(turn, f"{where}, {column}[{i}]", name, roles) for i, turn in enumerate(turns))


def _turn(turn: Any, where: str, name: Any, roles: Mapping[str, str]) -> tuple[str, str]:
    if not isinstance(turn, Mapping):
        raise DataError(f"{where}: a turn must be an object with a role and content, got {type(turn).__name__}.")
    role_key = next((k for k in (name("role"), "role", "from") if k in turn), None)
    content_key = next((k for k in (name("content"), "content", "value") if k in turn), None)
    if role_key is None or content_key is None:
        raise DataError(f"{where}: a turn needs role/content (or from/value) keys; it has {', '.join(sorted(turn))}.")
    role, content = turn[role_key], turn[content_key]
    if not isinstance(role, str) or role.strip().lower() not in roles:
        known = ", ".join(sorted(roles))
        raise DataError(
            f"{where}: unknown role {role!r}. Known roles: {known}. Map others with data.role_map, "
            f"e.g. {{narrator: system}}."
        )
    if not isinstance(content, str):
        raise DataError(f"{where}: field '{content_key}' must be a string, got {type(content).__name__}.")
    mapped = roles[role.strip().lower()]
    if mapped not in ROLES:
        raise DataError(f"{where}: data.role_map maps {role!r} to {mapped!r}; map roles to one of {', '.join(ROLES)}.")
    return mapped, content
