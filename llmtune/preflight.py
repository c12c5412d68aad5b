"""Checks that run before any model is loaded: do the data and model exist, are the data rows usable.

Example:
    >>> from llmtune.config import RunConfig
    >>> check_inputs(RunConfig.model_validate({"data": {"source": "no/such.jsonl"}}))
    Traceback (most recent call last):
    ...
    llmtune.preflight.PreflightError: data.source: 'no/such.jsonl' does not exist. ...
"""

from __future__ import annotations

from pathlib import Path

from llmtune import data
from llmtune.config import CHAT_TEMPLATE_NAMES, DEMO_MODEL_PATH, DataEntry, RunConfig
from llmtune.errors import LlmtuneError
from llmtune.paths import PROJECT_DIR


class PreflightError(LlmtuneError, ValueError):
    """An input the run cannot use; the message names it and what to do."""


def check_inputs(cfg: RunConfig, build_demo: bool = True) -> None:
    """Validate data and model sources; build the demo base model on first use."""
    _check_data(cfg)
    _check_model(cfg, build_demo)


# Appended to "does not exist" messages: where a relative path was looked for (llmtune/paths.py).
WHERE_PATHS_POINT = (
    "A relative path given with --config or --set is read from the folder you run the command in; one in a "
    "config file, next to that file, else in the project folder."
)


def _check_data(cfg: RunConfig) -> None:
    for entry in cfg.data.entries():
        _check_source(entry)
    template = cfg.data.chat_template
    if template and template not in CHAT_TEMPLATE_NAMES and not Path(template).is_file():
        raise PreflightError(
            f"data.chat_template: '{template}' does not exist. Give the path of a Jinja chat template file, or "
            f"one of the names {', '.join(CHAT_TEMPLATE_NAMES)}. {WHERE_PATHS_POINT}"
        )


def _check_source(entry: DataEntry) -> None:
    """One dataset (data.source, or an entry of data.sources) exists, and a local file has a usable row."""
    key, given = entry.key, str(entry.cfg.source)
    field = "data.source" if key == "data.source" else f"{key}.source"
    source = Path(given)
    if not source.exists() and not data.looks_like_hub_id(given):
        raise PreflightError(
            f"{field}: '{given}' does not exist. Point {field} at a JSONL, JSON, CSV, "
            f"Parquet or TXT file or a folder, or a Hub dataset id like owner/name. {WHERE_PATHS_POINT}"
        )
    if source.is_file():  # cheap to read and convert here; folders and Hub ids are read by the step
        try:  # raises when no row is usable, naming the first problems
            data.load_examples(entry.cfg, data.ErrorLog(entry.cfg.on_error))
        except data.DataError as err:
            prefix = "data.source: " if key == "data.source" else ""  # an entry's message starts with its key
            raise PreflightError(prefix + data.in_entry(entry, str(err))) from None


def _check_model(cfg: RunConfig, build_demo: bool) -> None:
    path = Path(cfg.model.name)
    if _is_demo_model(path) and not path.exists() and build_demo:
        from llmtune.demo import ensure_demo_model

        ensure_demo_model(path)
    if path.exists() and not (path / "config.json").is_file():
        raise PreflightError(
            f"model.name: '{path}' is a folder without config.json; it must be a model saved "
            f"with save_pretrained (or use a Hub id like meta-llama/Llama-3.2-1B-Instruct)."
        )
    if not path.exists() and not data.looks_like_hub_id(cfg.model.name):
        raise PreflightError(
            f"model.name: '{cfg.model.name}' is neither a local model folder nor a Hub id (owner/name). "
            f"{WHERE_PATHS_POINT}"
        )


def _is_demo_model(path: Path) -> bool:
    """The demo base, as the defaults name it (relative) or as load_config resolves it (in the project)."""
    return path == Path(DEMO_MODEL_PATH) or path == PROJECT_DIR / DEMO_MODEL_PATH
