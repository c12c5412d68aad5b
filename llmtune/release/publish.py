"""Publish an exported folder: the Hugging Face Hub and the MLflow Model Registry.

Both take a folder that is already complete on local disk and only read it, so a failed push leaves
the local export as it was. The Hub token is an argument: the caller resolves it (environment or a
ZenML secret), and it is never written anywhere nor shown in an error.

Example:
    >>> commit_message("finetune-2026_01_01", "0b5e", "e3f1")
    'llmtune: ZenML run finetune-2026_01_01 (id 0b5e), MLflow run e3f1'
    >>> str(PublishError("Hub push failed"))
    'Hub push failed'
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError

REGISTRY_ARTIFACT_PATH = "registered_model"


class PublishError(LlmtuneError, RuntimeError):
    """A destination refused or could not be reached; the message says why and what to do."""


def commit_message(zenml_run: str, zenml_run_id: str, mlflow_run_id: str | None) -> str:
    """The Hub commit message that links the upload to the runs that made it."""
    mlflow_part = f", MLflow run {mlflow_run_id}" if mlflow_run_id else ""
    return f"llmtune: ZenML run {zenml_run} (id {zenml_run_id}){mlflow_part}"


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    token: str | None,
    private: bool,
    message: str,
    endpoint: str | None = None,
    extra: dict[str, Path] | None = None,
) -> str:
    """Create the repo if needed and upload `folder`, and each `extra` folder under its key (e.g. gguf/), as one
    commit; return the commit URL."""
    from huggingface_hub import HfApi

    if not token:
        raise PublishError(
            f"No Hub token to push to '{repo_id}': set HF_TOKEN in the environment or export.hub_token_secret "
            f"to a ZenML secret with a 'token' value. The local export at {folder} is intact."
        )
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        operations = folder_operations(Path(folder), "")
        for prefix, extra_folder in (extra or {}).items():
            operations += folder_operations(extra_folder, prefix + "/")
        size = sum(Path(op.path_or_fileobj).stat().st_size for op in operations)
        # huggingface_hub draws its own bars for the large files; these lines frame them in the step log
        print(f"push: {len(operations)} files ({size / 2**20:,.1f} MiB) to the Hub repo {repo_id} ...", flush=True)
        started = time.perf_counter()
        info = api.create_commit(repo_id=repo_id, operations=operations, commit_message=message, repo_type="model")
    except Exception as err:  # httpx, HfHubHTTPError, OfflineModeIsEnabled...: one clear message for all
        raise PublishError(_explain_hub_failure(err, repo_id, folder, token, endpoint)) from None
    print(f"push: done in {time.perf_counter() - started:.1f} s: {info.commit_url}", flush=True)
    return str(info.commit_url)


def folder_operations(folder: Path, prefix: str) -> list[Any]:
    """One Hub upload per file of `folder`, at `prefix` + its path inside the folder."""
    from huggingface_hub import CommitOperationAdd

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [CommitOperationAdd(prefix + p.relative_to(folder).as_posix(), str(p)) for p in files]


def _explain_hub_failure(err: Exception, repo_id: str, folder: str | Path, token: str, endpoint: str | None) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        why = f"the Hub refused the token (HTTP {status}); check that HF_TOKEN or the secret holds a write token"
    elif status is not None:
        why = f"the Hub answered HTTP {status}"
    else:
        why = f"could not reach {endpoint or 'the Hub'} ({type(err).__name__})"
    detail = str(err).replace(token, "[token]").splitlines()[0] if str(err) else ""
    return (
        f"Hub push to '{repo_id}' failed: {why}. {detail} "
        f"The local export at {folder} is intact; push it later with: hf upload {repo_id} {folder}"
    ).replace("  ", " ")


def register_in_mlflow(
    folder: str | Path, name: str, run_id: str, tags: dict[str, str], tracking_uri: str | None = None
) -> dict[str, Any]:
    """Log `folder` to the MLflow run and register it as a new version of the registered model `name`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.log_artifacts(run_id, str(folder), REGISTRY_ARTIFACT_PATH)
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            client.create_registered_model(name, description="Fine-tuned with llmtune (QLoRA).")
        source = f"{client.get_run(run_id).info.artifact_uri}/{REGISTRY_ARTIFACT_PATH}"
        version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    except MlflowException as err:
        raise PublishError(
            f"MLflow registration of '{name}' failed: {err.message}. The local export at {folder} is intact."
        ) from None
    return {"mlflow_registered_model": name, "mlflow_model_version": str(version.version), "mlflow_source": source}
