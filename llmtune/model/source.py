"""Does `model.name` resolve before any step runs: a local model folder, or a Hub id cached here or reachable.

A local folder needs a readable config.json and safetensors weights. A Hub id is accepted when its
config.json is in the local Hugging Face cache (so offline runs work), else when the Hub says this token
may read it (`HfApi.auth_check`). Every refusal is one paragraph naming `model.name`, what to do, and
`HF_TOKEN` where a token would help.

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
import os
from pathlib import Path

from llmtune.config import DEMO_MODEL_PATH, did_you_mean
from llmtune.errors import LlmtuneError
from llmtune.model.hf import require_safetensors

TOKEN_ADVICE = (
    "If the model is gated or private, accept its terms on its Hub page and set HF_TOKEN to a token that can read "
    "it (huggingface.co/settings/tokens)."
)


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
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelSourceError(
            f"model.name: '{name}' is neither a local model folder nor a Hub id (owner/name). Check the path "
            "(relative to the project root) or use a Hub id like meta-llama/Llama-3.2-1B-Instruct."
        ) from None

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision, cache_dir=_hub_cache()), str):
        return  # downloaded before: loads offline too
    if _offline():
        raise ModelSourceError(
            f"model.name: '{name}' is not a local folder and not in the Hugging Face cache ({_hub_cache()}), and "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded. Download it once with network access (hf download "
            f"{name}), or point model.name at a local model folder. {TOKEN_ADVICE}"
        )
    _check_hub_access(name)


def _check_hub_access(name: str) -> None:
    """Ask the Hub whether this token may read `name` (a wrong revision is left to the loader's message)."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now: a test or mirror may set it late
    try:
        api.auth_check(name)
    except GatedRepoError:
        raise ModelSourceError(
            f"model.name: '{name}' is a gated Hub model and this token may not read it"
            f"{'' if os.environ.get('HF_TOKEN') else ' (HF_TOKEN is not set)'}. Accept its terms on "
            f"https://huggingface.co/{name}, then set HF_TOKEN to a token of that account."
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"model.name: '{name}' is neither a local folder nor a Hub model this token can see. Check the spelling "
            f"(a local path is relative to the project root). {TOKEN_ADVICE}"
        ) from None
    except HfHubHTTPError as err:
        raise ModelSourceError(
            f"model.name: the Hub refused '{name}' ({err}). {TOKEN_ADVICE}".replace("\n", " ")
        ) from None
    except (httpx.HTTPError, OfflineModeIsEnabled) as err:  # no connection, DNS, timeout
        raise _unreachable(name, err) from None


def _unreachable(name: str, err: BaseException) -> ModelSourceError:
    return ModelSourceError(
        f"model.name: '{name}' is not in the Hugging Face cache and the Hub cannot be reached ({type(err).__name__}: "
        f"{err}). Run once with network access to download it, set HF_ENDPOINT to a reachable mirror, or point "
        "model.name at a local model folder."
    )


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
