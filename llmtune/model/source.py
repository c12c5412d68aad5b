"""Does `model.name` resolve before any step runs: a local model folder, or a Hub id cached here or reachable.

A local folder needs a readable config.json and safetensors weights; a Hub id must be cached here or
readable with this token (`llmtune.hub`). Every refusal is one paragraph naming `model.name` and what to do.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "config.json").write_text("{not json")
    >>> try:
    ...     check_model_source(str(folder))
    ... except ModelSourceError as err:
    ...     print(err)
    model.name: the config.json of '...' is not valid JSON (Expecting property name ...). Re-save ...
"""

from __future__ import annotations

import json
from pathlib import Path

from llmtune import hub
from llmtune.config import DEMO_MODEL_PATH, did_you_mean
from llmtune.errors import LlmtuneError
from llmtune.model.hf import require_safetensors


class ModelSourceError(LlmtuneError, ValueError):
    """`model.name` names no model this run can load; the message says what to change."""


def check_model_source(name: str, revision: str | None = None) -> None:
    """Raise ModelSourceError unless `name` is a usable local folder or a Hub model cached here or reachable."""
    path = Path(name)
    if path.exists():
        _check_local_folder(path)
    elif hint := _local_path_hint(path):  # 'assets/demo-bse': a mistyped local path, not a Hub id
        raise ModelSourceError(
            f"model.name: '{name}' does not exist.{hint} Point model.name at a model folder saved with "
            "save_pretrained, or use a Hub id like meta-llama/Llama-3.2-1B-Instruct."
        )
    else:
        _check_hub_model(name, revision)


def _local_path_hint(path: Path) -> str:
    """' Did you mean ...?' when `path` is close to the demo base or to a folder next to it; else ''."""
    nearby = [str(p) for p in path.parent.iterdir() if p.is_dir()] if path.parent.name and path.parent.is_dir() else []
    return did_you_mean(str(path), [DEMO_MODEL_PATH, *nearby])


def _check_local_folder(path: Path) -> None:
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise ModelSourceError(
            f"model.name: '{path}' is not a folder with config.json; it must be a model saved with save_pretrained "
            "(or a Hub id like meta-llama/Llama-3.2-1B-Instruct)."
        )
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(
            f"model.name: the config.json of '{path}' is not valid JSON ({err}). Re-save the model with "
            "save_pretrained, or fix the file."
        ) from None
    if not isinstance(loaded, dict) or "model_type" not in loaded:
        raise ModelSourceError(
            f"model.name: the config.json of '{path}' has no 'model_type', so transformers cannot tell which "
            "architecture to build. Re-save the model with save_pretrained."
        )
    try:
        require_safetensors(path)
    except LlmtuneError as err:
        raise ModelSourceError(f"model.name: {err}") from None


def _check_hub_model(name: str, revision: str | None) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelSourceError(
            f"model.name: '{name}' is neither a local model folder nor a Hub id (owner/name). Check the path "
            "(relative to the project root) or use a Hub id like meta-llama/Llama-3.2-1B-Instruct."
        ) from None
    try:
        hub.check_readable(hub.HubRepo(name, "model", "model.name", revision))
    except hub.HubAccessError as err:
        raise ModelSourceError(str(err)) from None
