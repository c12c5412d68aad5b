"""Preference files (DPO chosen/rejected pairs, KTO labelled answers): recognised, refused, or used as SFT.

Read as plain SFT data, a DPO file would train on its prompt without either answer, and a KTO file
would train on the answers labelled undesirable. So a file with these columns stops with a message
that says what it is, unless `data.preference: chosen` asks to train on the chosen answers: the
DPO `chosen` answer, or the KTO rows labelled true (false rows are dropped and counted).

Layouts recognised: TRL's (`prompt` + `chosen`/`rejected` or + `completion`/`label`, as text or as
message lists, and implicit-prompt `chosen`/`rejected` conversations), LLaMA-Factory's (`conversations`
or `instruction` + `chosen`/`rejected`, a KTO `label` on any row) and OpenAI's preference fine-tuning
rows (`input.messages` + `preferred_output`/`non_preferred_output`).

Example:
    >>> row = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    >>> detect_preference(row)
    'dpo'
    >>> chosen_row(row, "dpo", "row 1")
    {'messages': [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]}
    >>> chosen_row({"prompt": "2+2?", "completion": "5", "label": False}, "kto", "row 2") is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from llmtune.data.errors import DataError

OPENAI_COLUMNS = ("preferred_output", "non_preferred_output")
TRUE_TEXT, FALSE_TEXT = ("true", "1", "yes"), ("false", "0", "no")  # CSV cells hold labels as text


def preference_columns(columns: Mapping[str, str] | None = None) -> set[str]:
    """The columns a preference layout reads, by their names in the data."""
    name = _namer(columns)
    return {name(c) for c in ("prompt", "completion", "chosen", "rejected", "label")} | {*OPENAI_COLUMNS, "input"}


def detect_preference(row: Mapping[str, Any], columns: Mapping[str, str] | None = None) -> str | None:
    """'dpo' for chosen/rejected pairs, 'kto' for answers with a true/false label, else None."""
    name = _namer(columns)
    if (name("chosen") in row and name("rejected") in row) or all(c in row for c in OPENAI_COLUMNS):
        return "dpo"
    if name("label") in row and _label(row[name("label")]) is not None:
        return "kto"
    return None


def refusal(kind: str, where: str, row: Mapping[str, Any]) -> str:
    """Why a preference file is not taken as SFT data, and the setting that uses it."""
    columns = ", ".join(sorted(row))
    if kind == "dpo":
        return (
            f"{where}: this is a preference (DPO) file: each row has a chosen and a rejected answer (columns: "
            f"{columns}). Read as SFT data it would train on the wrong targets. To fine-tune on the chosen answers "
            f"(the rejected ones are ignored), set data.preference: chosen; llmtune trains SFT, not DPO."
        )
    return (
        f"{where}: this is a KTO file: each row's answer has a true/false label (columns: {columns}), and rows "
        f"labelled false are answers to avoid. Read as SFT data they would be trained as targets. To fine-tune on "
        f"the answers labelled true (false rows are dropped and counted), set data.preference: chosen."
    )


def chosen_row(
    row: Mapping[str, Any], kind: str, where: str, columns: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """The row as SFT data with the chosen answer as the target; None for a KTO row labelled false."""
    name = _namer(columns)
    if kind == "kto":
        label = _label(row.get(name("label")))
        if label is None:
            raise DataError(f"{where}: field '{name('label')}' must be true or false, got {row.get(name('label'))!r}.")
        if not label:
            return None
        return _with_answer(_rest(row, name), row, name("completion"), where, name)
    if all(c in row for c in OPENAI_COLUMNS) and isinstance(row.get("input"), Mapping):
        return _openai_chosen(row, where, name)
    return _with_answer(_rest(row, name), row, name("chosen"), where, name)


def _namer(columns: Mapping[str, str] | None) -> Callable[[str], str]:
    return lambda field: (columns or {}).get(field, field)


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (*TRUE_TEXT, *FALSE_TEXT):
        return value.strip().lower() in TRUE_TEXT
    return None


def _rest(row: Mapping[str, Any], name: Callable[[str], str]) -> dict[str, Any]:
    """The row without its preference columns (which would otherwise be reported as unused)."""
    dropped = {name(c) for c in ("chosen", "rejected", "label", "completion", "prompt")}
    return {k: v for k, v in row.items() if k not in dropped}


def _with_answer(
    rest: dict[str, Any], row: Mapping[str, Any], answer_column: str, where: str, name: Callable[[str], str]
) -> dict[str, Any]:
    """Attach the answer to whatever holds the prompt: a conversation, an Alpaca instruction, or a prompt column."""
    if answer_column not in row:
        raise DataError(f"{where}: missing field '{answer_column}' (columns present: {', '.join(sorted(row))}).")
    answer = row[answer_column]
    for conversation in (name("conversations"), name("messages")):
        if conversation in rest:
            return {**rest, conversation: [*_as_list(rest[conversation]), *_answer_turns(answer)]}
    if name("instruction") in rest:
        if not isinstance(answer, str):
            raise DataError(f"{where}: field '{answer_column}' must be a string for an instruction row.")
        return {**rest, name("output"): answer}
    if name("prompt") in row:
        return {**rest, name("messages"): [*_prompt_turns(row[name("prompt")]), *_answer_turns(answer)]}
    if isinstance(answer, list):  # TRL's implicit prompt: the whole conversation, ending in the answer
        return {**rest, name("messages"): answer}
    raise DataError(
        f"{where}: field '{answer_column}' is text, and the row has no prompt ('{name('prompt')}', a conversation "
        f"or an instruction) to answer; map the prompt column with data.columns, e.g. {{prompt: question}}."
    )


def _openai_chosen(row: Mapping[str, Any], where: str, name: Callable[[str], str]) -> dict[str, Any]:
    given = row["input"]
    if not isinstance(given.get("messages"), list):
        raise DataError(f"{where}: field 'input' needs a 'messages' list (OpenAI preference rows).")
    chosen = {name("messages"): [*given["messages"], *_as_list(row["preferred_output"])]}
    return {**chosen, name("tools"): given["tools"]} if given.get("tools") else chosen


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _prompt_turns(prompt: Any) -> list[Any]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_list(prompt)


def _answer_turns(answer: Any) -> list[Any]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else _as_list(answer)
