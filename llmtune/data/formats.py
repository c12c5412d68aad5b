"""Row formats (alpaca, sharegpt, messages, text) turned into one `Example` form, with format detection.

Column names can be remapped (`data.columns`) and role names extended (`data.role_map`); every
problem names the row and the field. Chat rows may carry tool calls: OpenAI-style assistant turns
with `tool_calls` and `tool` turns with the results, ShareGPT `function_call` / `observation` turns,
and a `tools` column of function schemas, which the chat template renders. Message content may be a
string or a list of typed parts; text parts are joined, other parts refused or dropped
(`data.non_text_parts`).

Example:
    >>> ex = to_example({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca", "row 1")
    >>> ex.pairs()
    (('user', 'Add\\n\\n1 2'), ('assistant', '3'))
    >>> detect_format({"conversations": [{"from": "human", "value": "hi"}]})
    'sharegpt'
    >>> row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
    ...        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'}]}
    >>> to_example(row, "sharegpt", "row 1").messages()[1]["tool_calls"]
    [{'type': 'function', 'function': {'name': 'weather', 'arguments': {'city': 'Paris'}}}]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmtune.config import ROLE_TARGETS
from llmtune.data.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "text")
ROLES = ("system", "user", "assistant", "tool")
# Role names seen in the wild (ShareGPT exports, OpenAI logs, Gemini data, LLaMA-Factory tool rows) mapped to
# the chat roles; 'tool_call' is an assistant turn whose value is a call ({"name": ..., "arguments": ...}).
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
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
    "function_call": "tool_call",
}
assert set(DEFAULT_ROLE_NAMES.values()) <= set(ROLE_TARGETS)
TEXT_PART_TYPES = ("text", "input_text", "output_text")  # chat-completions and responses-API names for text
PART_SEPARATOR = "\n"  # between the text parts of one message, so words of adjacent parts never run together

Namer = Callable[[str], str]


@dataclass(frozen=True)
class Turn:
    """One chat turn. Tool calls are canonical JSON (hashable, so duplicates are found on what is rendered)."""

    role: str
    content: str
    tool_calls: str | None = None
    tool_call_id: str | None = None
    name: str | None = None
    trained: bool = True  # False for an assistant turn with OpenAI's "weight": 0

    def message(self) -> dict[str, Any]:
        """The turn as the chat template reads it (transformers' message layout)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = json.loads(self.tool_calls)
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message

    @property
    def is_answer(self) -> bool:
        """An assistant turn that carries loss: it says something or calls a tool, and is not weighted 0."""
        return self.role == "assistant" and self.trained and bool(self.content.strip() or self.tool_calls)


@dataclass(frozen=True)
class Example:
    """One training example: chat turns and tool schemas, or plain text for completion training.

    `where` (file and row) and `dropped_parts` (non-text parts left out) describe it without being part
    of it: two rows that render the same are duplicates wherever they come from.
    """

    turns: tuple[Turn, ...] = ()
    text: str | None = None
    tools: str | None = None  # the row's tool schemas as JSON, passed to the template as `tools`
    where: str = field(default="", compare=False)
    dropped_parts: int = field(default=0, compare=False)

    def __post_init__(self) -> None:  # (role, content) pairs are accepted for brevity
        turns = tuple(t if isinstance(t, Turn) else Turn(*t) for t in self.turns)
        object.__setattr__(self, "turns", turns)

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def messages(self) -> list[dict[str, Any]]:
        return [turn.message() for turn in self.turns]

    def tool_schemas(self) -> list[dict[str, Any]] | None:
        return json.loads(self.tools) if self.tools else None

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((turn.role, turn.content) for turn in self.turns)

    def is_empty(self) -> bool:
        """Nothing to learn from: blank text, or no assistant turn that answers or calls a tool."""
        if self.text is not None:
            return not self.text.strip()
        return not any(turn.is_answer for turn in self.turns)

    def empty_answers(self) -> int:
        """Assistant turns with neither content nor a tool call: kept in the prompt, never trained."""
        return sum(t.role == "assistant" and not (t.content.strip() or t.tool_calls) for t in self.turns)

    def uses_tools(self) -> tuple[bool, bool]:
        """(has tool schemas, has tool calls): what the chat template must be able to render."""
        return bool(self.tools), any(turn.tool_calls for turn in self.turns)


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


def used_columns(fmt: str, columns: Mapping[str, str] | None = None) -> set[str]:
    """The columns a format reads (by their names in the data), so the rest can be reported as unused.

    >>> sorted(used_columns("alpaca", {"output": "answer"}))
    ['answer', 'history', 'input', 'instruction', 'system']
    """
    name = _column_namer(columns or {})
    fields = {
        "alpaca": ("instruction", "input", "output", "system", "history"),
        "sharegpt": ("conversations", "system", "tools"),
        "messages": ("messages", "system", "tools"),
        "text": ("text",),
    }[fmt]
    return {name(f) for f in fields}


def to_example(
    row: Mapping[str, Any],
    fmt: str,
    where: str,
    columns: Mapping[str, str] | None = None,
    role_map: Mapping[str, str] | None = None,
    non_text_parts: str = "error",
) -> Example:
    """Convert one row of format `fmt`; raises DataError naming `where` and the field."""
    name = _column_namer(columns or {})
    if fmt == "alpaca":
        return _from_alpaca(row, where, name)
    if fmt == "text":
        return Example(text=_string_field(row, name("text"), where, required=True), where=where)
    if fmt in ("sharegpt", "messages"):
        return _from_chat(row, fmt, where, name, {**DEFAULT_ROLE_NAMES, **(role_map or {})}, non_text_parts)
    raise DataError(f"Unknown data.format '{fmt}'; use auto or one of {', '.join(FORMATS)}.")


def _column_namer(columns: Mapping[str, str]) -> Namer:
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


def _json_list(value: Any, where: str, what: str) -> list[Any]:
    """A list, or a string holding a JSON list (CSV cells and some exports store lists as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {what} is a string that is not a JSON list.") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: field {what} must be a list, got {type(value).__name__}.")
    return value


def _from_alpaca(row: Mapping[str, Any], where: str, name: Namer) -> Example:
    instruction = _string_field(row, name("instruction"), where, required=True).strip()
    extra_input = _string_field(row, name("input"), where, required=False).strip()
    output = _string_field(row, name("output"), where, required=True).strip()
    system = _string_field(row, name("system"), where, required=False).strip()
    prompt = f"{instruction}\n\n{extra_input}" if extra_input else instruction
    turns = [Turn("system", system)] if system else []
    turns += _alpaca_history(row, where, name("history"))
    turns += [Turn("user", prompt), Turn("assistant", output)]
    fields = [name(f) for f in ("system", "history", "instruction", "input", "output") if row.get(name(f))]
    return Example(turns=tuple(turns), where=f"{where}, fields {', '.join(repr(f) for f in fields)}")


def _alpaca_history(row: Mapping[str, Any], where: str, column: str) -> list[Turn]:
    """Earlier turns of an Alpaca row (LLaMA-Factory's `history`: [[instruction, answer], ...])."""
    if row.get(column) in (None, "", []):
        return []
    turns = []
    for i, pair in enumerate(_json_list(row[column], where, f"'{column}'")):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"{where}, {column}[{i}]: each history entry must be [instruction, answer] strings.")
        turns += [Turn("user", pair[0].strip()), Turn("assistant", pair[1].strip())]
    return turns


def _from_chat(
    row: Mapping[str, Any], fmt: str, where: str, name: Namer, roles: Mapping[str, str], non_text_parts: str
) -> Example:
    column = name("conversations" if fmt == "sharegpt" else "messages")
    if column not in row or row[column] is None:
        raise DataError(f"{where}: missing field '{column}' (columns present: {', '.join(sorted(row))}).")
    raw = row[column]
    if isinstance(raw, str):  # CSV cells and some exports hold the conversation as a JSON string
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field '{column}' is a string that is not a JSON list of turns.") from None
    if not isinstance(raw, list):
        raise DataError(f"{where}: field '{column}' must be a list of turns, got {type(raw).__name__}.")
    if not raw:
        raise DataError(f"{where}: field '{column}' is an empty conversation.")
    parsed = [_turn(turn, f"{where}, {column}[{i}]", name, roles, non_text_parts) for i, turn in enumerate(raw)]
    turns = _with_system_column(row, [t for t, _ in parsed], where, name("system"))
    tools = _tools(row, where, name("tools"))
    dropped = sum(n for _, n in parsed)
    return Example(turns=tuple(turns), tools=tools, where=f"{where}, field '{column}'", dropped_parts=dropped)


def _with_system_column(row: Mapping[str, Any], turns: list[Turn], where: str, column: str) -> list[Turn]:
    """A row-level system prompt (LLaMA-Factory's `system` column) goes first, unless a system turn says it."""
    system = _string_field(row, column, where, required=False).strip()
    if not system:
        return turns
    if turns and turns[0].role == "system":
        if turns[0].content.strip() != system:
            raise DataError(
                f"{where}: field '{column}' and the conversation's own system turn differ; keep one of them."
            )
        return turns
    return [Turn("system", system), *turns]


def _turn(turn: Any, where: str, name: Namer, roles: Mapping[str, str], non_text_parts: str) -> tuple[Turn, int]:
    """One turn and how many non-text content parts were dropped from it."""
    if not isinstance(turn, Mapping):
        raise DataError(f"{where}: a turn must be an object with a role and content, got {type(turn).__name__}.")
    role_key = next((k for k in (name("role"), "role", "from") if k in turn), None)
    content_key = next((k for k in (name("content"), "content", "value") if k in turn), None)
    calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else None)
    if role_key is None or (content_key is None and not calls):
        raise DataError(f"{where}: a turn needs role/content (or from/value) keys; it has {', '.join(sorted(turn))}.")
    mapped = _role(turn[role_key], where, roles)
    content, dropped = _content(turn.get(content_key) if content_key else None, where, content_key, non_text_parts)
    if mapped == "tool_call":  # ShareGPT function_call turn: the value is the call itself
        calls, content = _json_calls(content, where, content_key or "value"), ""
    if calls and mapped != "assistant" and mapped != "tool_call":
        raise DataError(f"{where}: only assistant turns can make tool calls; this turn's role is {mapped!r}.")
    return (
        Turn(
            role="assistant" if mapped == "tool_call" else mapped,
            content=content,
            tool_calls=_canonical_calls(calls, where) if calls else None,
            tool_call_id=_optional_string(turn, "tool_call_id", where) if mapped == "tool" else None,
            name=_optional_string(turn, "name", where) if mapped == "tool" else None,
            trained=_weight(turn, where),
        ),
        dropped,
    )


def _role(role: Any, where: str, roles: Mapping[str, str]) -> str:
    if not isinstance(role, str) or role.strip().lower() not in roles:
        known = ", ".join(sorted(roles))
        raise DataError(
            f"{where}: unknown role {role!r}. Known roles: {known}. Map others with data.role_map, "
            f"e.g. {{narrator: system}}."
        )
    mapped = roles[role.strip().lower()]
    if mapped not in ROLE_TARGETS:
        raise DataError(
            f"{where}: data.role_map maps {role!r} to {mapped!r}; map roles to one of {', '.join(ROLE_TARGETS)}."
        )
    return mapped


def _content(value: Any, where: str, key: str | None, non_text_parts: str) -> tuple[str, int]:
    """Message text and the number of non-text parts dropped: a string, null (a tool-call turn), or typed parts."""
    if value is None:
        return "", 0
    if isinstance(value, str):
        return value, 0
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{key}' must be a string or a list of parts, got {type(value).__name__}.")
    texts, dropped = [], 0
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif non_text_parts == "drop" and isinstance(kind, str):
            dropped += 1
        elif isinstance(kind, str):
            raise DataError(
                f"{where}, {key}[{i}]: a '{kind}' part; only text is trained. Set data.non_text_parts: drop to "
                f"train on the text parts alone (dropped parts are counted in the report), or remove the part."
            )
        else:
            raise DataError(f"{where}, {key}[{i}]: a content part must be an object with a 'type' (e.g. text).")
    return PART_SEPARATOR.join(texts), dropped


def _json_calls(value: str, where: str, key: str) -> list[Any]:
    """A ShareGPT function_call value: one call {"name", "arguments"} or a list of them, as JSON text."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        raise DataError(f"{where}: field '{key}' of a function_call turn is not JSON ({value[:60]!r}).") from None
    return calls if isinstance(calls, list) else [calls]


def _canonical_calls(calls: Any, where: str) -> str:
    """Tool calls in transformers' layout: {type: function, function: {name, arguments: object}} (id kept)."""
    if not isinstance(calls, list):
        raise DataError(f"{where}: field 'tool_calls' must be a list of calls, got {type(calls).__name__}.")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}, tool_calls[{i}]: a call needs a function name (and arguments).")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends arguments as JSON text; templates expect an object
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise DataError(f"{where}, tool_calls[{i}]: 'arguments' is a string that is not JSON.") from None
        canonical: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        out.append({"id": call["id"], **canonical} if isinstance(call, Mapping) and call.get("id") else canonical)
    return json.dumps(out, ensure_ascii=False)


def _tools(row: Mapping[str, Any], where: str, column: str) -> str | None:
    """The row's tool schemas as JSON; bare function schemas (LLaMA-Factory) get OpenAI's {type, function} wrapper."""
    if row.get(column) in (None, "", []):
        return None
    schemas = []
    for i, tool in enumerate(_json_list(row[column], where, f"'{column}'")):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise DataError(f"{where}, {column}[{i}]: a tool must be a function schema with a name.")
        schemas.append(tool if "function" in tool else {"type": "function", "function": dict(function)})
    return json.dumps(schemas, ensure_ascii=False)


def _optional_string(turn: Mapping[str, Any], key: str, where: str) -> str | None:
    value = turn.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}.")
    return value or None


def _weight(turn: Mapping[str, Any], where: str) -> bool:
    """OpenAI's per-message `weight` (0 or 1): 0 keeps the turn in the prompt but trains nothing on it."""
    weight = turn.get("weight", 1)
    if weight not in (0, 1):
        raise DataError(f"{where}: field 'weight' must be 0 or 1, got {weight!r}.")
    return bool(weight)
