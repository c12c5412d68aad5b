"""Can a Hub model or dataset be read before any step runs: from the local cache, or from the Hub with this token.

A repo is accepted when it is in the local Hugging Face cache (so offline runs work), else when the Hub says
this token may read it (`HfApi.auth_check`). Every refusal is one paragraph that starts with the setting that
named the repo, says what to do, and names `HF_TOKEN` where a token would help.

Example:
    >>> repo = HubRepo("owner/rows", "dataset", "data.sources[1].source")
    >>> repo.download, repo.page
    ('hf download owner/rows --repo-type dataset', 'https://huggingface.co/datasets/owner/rows')
    >>> check_readable(repo)  # offline, never downloaded  # doctest: +SKIP
    HubAccessError: data.sources[1].source: 'owner/rows' is not a local folder and not in the Hugging Face cache ...
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmtune.errors import LlmtuneError

TOKEN_ADVICE = (
    "If the {kind} is gated or private, accept its terms on its Hub page and set HF_TOKEN to a token that can "
    "read it (huggingface.co/settings/tokens)."
)


class HubAccessError(LlmtuneError, ValueError):
    """A Hub repo this run cannot read; the message says which setting named it and what to do."""


@dataclass(frozen=True)
class HubRepo:
    """A Hub id as a setting names it: `HubRepo("meta-llama/Llama-3.2-1B", "model", "model.name")`."""

    name: str
    kind: Literal["model", "dataset"]
    field: str
    revision: str | None = None

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{'datasets/' if self.kind == 'dataset' else ''}{self.name}"

    @property
    def download(self) -> str:
        return f"hf download {self.name}{' --repo-type dataset' if self.kind == 'dataset' else ''}"


def check_readable(repo: HubRepo) -> None:
    """Raise HubAccessError unless `repo` is in the local cache, or (online) this token may read it."""
    if in_local_cache(repo):
        return
    if offline():
        raise HubAccessError(
            f"{repo.field}: '{repo.name}' is not a local folder and not in the Hugging Face cache ({hub_cache()}), "
            f"and HF_HUB_OFFLINE is set, so it cannot be downloaded. Download it once with network access "
            f"({repo.download}), or point {repo.field} at a local {_local_kind(repo)}. "
            + TOKEN_ADVICE.format(kind=repo.kind)
        )
    _ask_the_hub(repo)


def in_local_cache(repo: HubRepo) -> bool:
    """Whether the repo was downloaded here before: its snapshot in the Hub cache, or (a dataset) its Arrow
    files in the `datasets` cache, which `datasets.load_dataset` falls back to offline."""
    from huggingface_hub import try_to_load_from_cache

    if repo.kind == "model":
        found = try_to_load_from_cache(repo.name, "config.json", revision=repo.revision, cache_dir=hub_cache())
        return isinstance(found, str)
    snapshots = Path(hub_cache()) / f"datasets--{repo.name.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    return bool(_datasets_cache_dirs(repo.name))


def _datasets_cache_dirs(name: str) -> list[str]:
    """The `<cache>/<owner>___<name>/<subset>/<version>/<hash>` folders of a Hub dataset, as `datasets` names them."""
    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    root = os.environ.get("HF_DATASETS_CACHE") or str(config.HF_DATASETS_CACHE)  # read now: a test may set it late
    *owner, dataset = name.split("/")
    folder = "___".join([*owner, camelcase_to_snakecase(dataset)])
    found = glob.glob(os.path.join(os.path.expanduser(root), folder, "*", "*", "*"))
    return [path for path in found if os.path.isdir(path)]


def _ask_the_hub(repo: HubRepo) -> None:
    """Ask the Hub whether this token may read the repo (a wrong revision is left to the loader's message)."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)  # read now: a test or mirror may set it late
    advice = TOKEN_ADVICE.format(kind=repo.kind)
    try:
        api.auth_check(repo.name, repo_type=repo.kind)
    except GatedRepoError:
        raise HubAccessError(
            f"{repo.field}: '{repo.name}' is a gated Hub {repo.kind} and this token may not read it"
            f"{'' if os.environ.get('HF_TOKEN') else ' (HF_TOKEN is not set)'}. Accept its terms on "
            f"{repo.page}, then set HF_TOKEN to a token of that account."
        ) from None
    except RepositoryNotFoundError:
        raise HubAccessError(
            f"{repo.field}: '{repo.name}' is neither a local folder nor a Hub {repo.kind} this token can see. Check "
            f"the spelling of the id or path. {advice}"
        ) from None
    except HfHubHTTPError as err:
        refused = f"{repo.field}: the Hub refused '{repo.name}' ({err}). {advice}"
        raise HubAccessError(refused.replace("\n", " ")) from None
    except (httpx.HTTPError, OfflineModeIsEnabled) as err:  # no connection, DNS, timeout
        raise HubAccessError(
            f"{repo.field}: '{repo.name}' is not in the Hugging Face cache and the Hub cannot be reached "
            f"({type(err).__name__}: {err}). Run once with network access to download it, set HF_ENDPOINT to a "
            f"reachable mirror, or point {repo.field} at a local {_local_kind(repo)}."
        ) from None


def _local_kind(repo: HubRepo) -> str:
    return "model folder" if repo.kind == "model" else "data file or folder"


def hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
