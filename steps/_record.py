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
