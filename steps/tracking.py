"""The one place where step results are tracked: ZenML step (and model version) metadata and the run's MLflow run.

The library returns values or takes a callback (`metric_logger` for the training loss as it falls); only
this module talks to MLflow's active run or to ZenML's metadata, so a step without an MLflow experiment
tracker (or a test without a stack) records metadata and skips the rest.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from zenml import get_step_context, log_metadata

from llmtune.config import RunConfig
from llmtune.errors import leave_for_cli

ZENML_MLFLOW_LOGGER = "zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker"


class AbsentAutologFlavorFilter(logging.Filter):
    """Drops ZenML's after-every-step warning "Failed to disable MLflow autologging for ... ['fastai']" when
    every framework it names has no MLflow flavor to disable (MLflow 3 removed `mlflow.fastai`): nothing was
    logging, so there is nothing to warn about. A flavor that exists and failed to disable still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Failed to disable MLflow autologging"):
            return True
        frameworks = re.findall(r"'(\w+)'", message)
        return not frameworks or any(importlib.util.find_spec(f"mlflow.{name}") for name in frameworks)


logging.getLogger(ZENML_MLFLOW_LOGGER).addFilter(AbsentAutologFlavorFilter())


# Step metadata key under which `record` keeps what it logged to MLflow, so a run that reuses the step from
# ZenML's cache can log the same (see `replay_cached_steps`).
LOGGED_KEY = "mlflow_logged"
REPLAYED_TAG = "llmtune.replayed_cached_steps"
# MLflow 3's UI opens an experiment of this kind on its runs (training), not on GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A saved view of the runs table (what the UI's Share button stores as an experiment tag and opens from
# `?viewStateShareKey=`): the columns a fine-tuning run is judged by, without picking them by hand.
RUNS_VIEW_KEY = "llmtune"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"


def record(
    metadata: dict[str, Any], params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None
) -> None:
    """Log `metadata` on the step, `params` and `metrics` to the active MLflow run.

    The params and metrics are kept in the step's metadata too, and the MLflow run first gets those of the
    run's cached steps (`replay_cached_steps`), so a run that reused steps is tracked like the one that ran them.
    """
    clean = {k: "null" if v is None else v for k, v in (params or {}).items()}
    log_metadata(metadata={**metadata, LOGGED_KEY: {"params": clean, "metrics": dict(metrics or {})}})
    if mlflow.active_run() is None:
        return
    for key, value in EXPERIMENT_KIND.items():
        mlflow.set_experiment_tag(key, value)
    replay_cached_steps()
    if clean:
        mlflow.log_params(clean)
    if metrics:
        mlflow.log_metrics(metrics)


def replay_cached_steps() -> None:
    """Log to the active MLflow run the params and metrics that this pipeline run's cached steps logged when
    they ran (kept in their metadata by `record`); each cached step once, keys already logged left as they are."""
    from zenml.client import Client

    run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]  # record checked there is one
    logged = mlflow.get_run(run_id).data
    done = set(filter(None, logged.tags.get(REPLAYED_TAG, "").split(",")))
    client = Client()
    pipeline_run = client.get_pipeline_run(get_step_context().pipeline_run.id)
    for name, step in pipeline_run.steps.items():
        if step.status.value != "cached" or name in done or step.original_step_run_id is None:
            continue
        tracked = client.get_run_step(step.original_step_run_id).run_metadata.get(LOGGED_KEY)
        if not isinstance(tracked, dict):  # a step that logged nothing, or ran before this was kept
            continue
        params = {k: v for k, v in tracked.get("params", {}).items() if k not in logged.params}
        if params:
            mlflow.log_params(params)
        if tracked.get("metrics"):
            mlflow.log_metrics(tracked["metrics"])
        done.add(name)
    mlflow.set_tag(REPLAYED_TAG, ",".join(sorted(done)))


def on_model_version(metadata: dict[str, Any]) -> None:
    """The same facts on the run's ZenML Model version (Model Control Plane), when the run has one."""
    if get_step_context().model_version is not None:
        log_metadata(metadata=metadata, infer_model=True)


def section_params(section: str, values: Any) -> dict[str, Any]:
    """A config section as dotted MLflow params: {'training.max_steps': 300, ...}.

    A list of entries (data.sources) is one param with each entry's set fields only, to stay readable.
    """
    return {f"{section}.{k}": _compact(v) for k, v in values.model_dump().items()}


def _compact(value: Any) -> Any:
    if isinstance(value, list):
        return [{k: v for k, v in item.items() if v is not None} if isinstance(item, dict) else item for item in value]
    return value


def metric_logger(name: str) -> Callable[[float, int], None]:
    """A callback for the library that logs `name` at a step to the active MLflow run (a no-op without one)."""

    def log(value: float, step: int) -> None:
        if mlflow.active_run() is not None:
            mlflow.log_metric(name, value, step=step)

    return log


def step_metric_logger() -> Callable[[str, float, int], None]:
    """A callback for the library that logs any named value at a step (learning rate, grad norm, ...)."""

    def log(name: str, value: float, step: int) -> None:
        if mlflow.active_run() is not None:
            mlflow.log_metric(name, value, step=step)

    return log


def log_files(paths: list[Path], folder: str) -> None:
    """Files (or whole folders) as MLflow artifacts under `folder`, by path (nothing is re-uploaded later)."""
    if mlflow.active_run() is None:
        return
    for path in paths:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=folder)
        else:
            mlflow.log_artifact(str(path), artifact_path=folder)


def log_text(text: str, name: str) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_text(text, name)


def log_table(columns: dict[str, list[Any]], name: str) -> None:
    """A table the MLflow UI shows in the run's Artifacts tab."""
    if mlflow.active_run() is not None:
        mlflow.log_table(columns, artifact_file=name)


def set_tags(tags: dict[str, str]) -> None:
    if mlflow.active_run() is not None:
        mlflow.set_tags(tags)


def mlflow_run() -> tuple[str, str] | None:
    """(run id, tracking URI) of the active MLflow run, for destinations that need them (the model registry)."""
    active = mlflow.active_run()
    return (active.info.run_id, mlflow.get_tracking_uri()) if active is not None else None


def alias_registered_version(name: str, alias: str, version: str) -> None:
    """Give an MLflow registry version the stage's name as an alias (the ZenML stage change's twin)."""
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def runs_view_columns(gate_metric: str) -> list[str]:
    """The runs table's columns for the saved view, in the UI's `<type>.`<key>`` form: final train loss, base
    and tuned eval loss and gate metric, the verdict.

    >>> runs_view_columns("exact_match")[-3:]
    ['metrics.`base_exact_match`', 'metrics.`tuned_exact_match`', 'tags.`llmtune.verdict`']
    """
    metrics = ["final_train_loss", "base_eval_loss", "tuned_eval_loss"]
    if gate_metric != "eval_loss":
        metrics += [f"base_{gate_metric}", f"tuned_{gate_metric}"]
    return [*(f"metrics.`{name}`" for name in metrics), "tags.`llmtune.verdict`"]


def save_runs_view(gate_metric: str) -> None:
    """Store the runs table view on the active run's experiment (`runs_view_url` opens it)."""
    if mlflow.active_run() is None:
        return
    view = {"selectedColumns": runs_view_columns(gate_metric)}
    mlflow.set_experiment_tag(RUNS_VIEW_TAG, json.dumps(view))


def runs_view_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs in the saved view.

    >>> runs_view_url("http://127.0.0.1:5000", "1")
    'http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=llmtune'
    """
    return f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}"


def log_run_config_params(cfg: RunConfig) -> None:
    """Every section of the run's config as MLflow params, from the one step that always runs.

    Steps log their own section when they run, but a step served from ZenML's cache does not run, so
    without this a run that reused cached data or a cached base would lack those params in MLflow.
    What a step already logged stays (e.g. the prepare step's detected `data.format` for `auto`).
    """
    active = mlflow.active_run()
    if active is None:
        return
    logged = mlflow.get_run(active.info.run_id).data.params
    params: dict[str, Any] = {}
    for section in RunConfig.model_fields:
        params.update(section_params(section, getattr(cfg, section)))
    missing = {k: "null" if v is None else v for k, v in params.items() if k not in logged}
    if missing:
        mlflow.log_params(missing)
    mlflow.log_text(cfg.to_yaml(), "config.yaml")
    save_runs_view(cfg.promotion.metric)


def leave_user_error(exception: BaseException) -> None:
    """The pipelines' failure hook: a step stopped by an error the user can fix leaves it for the CLI, which
    prints it as one paragraph with exit 2 (the orchestrator itself re-raises a generic RuntimeError)."""
    leave_for_cli(exception)
