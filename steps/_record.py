"""Where step results go besides the artifact: ZenML step metadata and the run's MLflow run."""

from __future__ import annotations

from typing import Any

import mlflow
from zenml import log_metadata


def record(
    metadata: dict[str, Any], params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None
) -> None:
    """Log `metadata` on the step, `params` and `metrics` to the active MLflow run."""
    log_metadata(metadata=metadata)
    if mlflow.active_run() is None:
        return
    if params:
        mlflow.log_params({k: "null" if v is None else v for k, v in params.items()})
    if metrics:
        mlflow.log_metrics(metrics)


def section_params(section: str, values: Any) -> dict[str, Any]:
    """A config section as dotted MLflow params: {'training.max_steps': 300, ...}."""
    return {f"{section}.{k}": v for k, v in values.model_dump().items()}


def log_run_config_params(resolved_config: str) -> None:
    """Every section of the run's config as MLflow params, from the one step that always runs.

    Steps log their own section when they run, but a step served from ZenML's cache does not run, so
    without this a run that reused cached data or a cached base would lack those params in MLflow.
    What a step already logged stays (e.g. the prepare step's detected `data.format` for `auto`).
    """
    active = mlflow.active_run()
    if active is None:
        return
    logged = mlflow.get_run(active.info.run_id).data.params
    import yaml

    from llmtune.config import RunConfig

    cfg = RunConfig.from_stored(yaml.safe_load(resolved_config))
    params: dict[str, Any] = {}
    for section in RunConfig.model_fields:
        params.update(section_params(section, getattr(cfg, section)))
    missing = {k: "null" if v is None else v for k, v in params.items() if k not in logged}
    if missing:
        mlflow.log_params(missing)
