"""Step 7: merge onto the 16-bit base, verify, export with model cards, publish, then promote (`llmtune.release`).

Runs only for a verdict that passed (or no gate: `--pipeline export`). The merge check is recorded
before anything is written; the version is promoted only after everything asked for is published.
Secrets are resolved here, never in llmtune/. Not cached: publishing is a side effect.
"""

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from zenml import get_step_context, save_artifact, step
from zenml.enums import ArtifactType

from llmtune import release
from llmtune.artifacts import Adapter, EvalReport, MergedModel, PreparedData, QuantizedBase, TrainingReport
from llmtune.config import ExportConfig, RunConfig
from steps import tracking


@step(experiment_tracker=True, enable_cache=False)
def merge_and_push(
    base: QuantizedBase,
    adapter: Adapter,
    data: PreparedData,
    eval_report: EvalReport,
    training: TrainingReport | None,
    config: RunConfig,
    verdict: dict[str, Any] | None = None,
    training_run: str | None = None,
) -> Annotated[dict[str, Any], "export_report"]:
    tracking.log_run_config_params(config)
    if verdict is not None and not verdict["gate_passed"]:
        return {"released": False, "gate_verdict": verdict["gate_verdict"]}
    run = get_step_context().pipeline_run
    mlflow_run = tracking.mlflow_run()
    trail = {"zenml_run": run.name, "zenml_run_id": str(run.id), "training_run": training_run or run.name}
    trail["mlflow_run_id"] = mlflow_run[0] if mlflow_run else ""
    inputs = release.ReleaseInputs(
        config, Path(base.path), Path(adapter.path), Path(data.path), eval_report, training, trail
    )
    where = release.Destinations(run.name, hub_token(config.export), mlflow_run[1] if mlflow_run else None)
    report = release.release(inputs, where, Path(tempfile.mkdtemp(prefix="llmtune-export-")), record_check)
    save_artifact(MergedModel(str(report.merged_dir)), name="merged_model", artifact_type=ArtifactType.MODEL)
    if "gguf" in report.folders:  # by path: the checked files and their Modelfile, in the run's MLflow artifacts
        tracking.log_files([Path(report.local.get("gguf_path") or report.folders["gguf"])], "gguf")
    done = {**report.destinations(), **promote(verdict, report.published)}
    tracking.record(metadata=done)
    tracking.on_model_version({**report.merge_check, **report.gguf_check, **done})
    return {"released": True, **report.merge_check, **report.gguf_check, **done}


def record_check(check: dict[str, Any]) -> None:
    """A check result (the merge check, then the GGUF check) as step metadata, its logit gaps as MLflow metrics."""
    gaps = {k: float(v) for k, v in check.items() if k.endswith("max_logit_gap")}
    tracking.record(metadata=check, metrics=gaps)


def promote(verdict: dict[str, Any] | None, published: dict[str, Any]) -> dict[str, Any]:
    """Move the run's ZenML Model version (and its MLflow registry version, if any) to the verdict's stage."""
    stage, version = (verdict or {}).get("gate_promote_to"), get_step_context().model_version
    if not stage or version is None:
        return {}
    version.set_stage(stage, force=True)  # force: the version that held the stage is moved out of it
    if published.get("mlflow_registered_model"):
        tracking.alias_registered_version(
            published["mlflow_registered_model"], stage, published["mlflow_model_version"]
        )
    return {"promoted_to": stage, "promoted_version": str(version.number)}


def hub_token(cfg: ExportConfig) -> str | None:
    if cfg.hub_token_secret:
        from zenml.client import Client

        return Client().get_secret(cfg.hub_token_secret).secret_values.get("token")
    return os.environ.get("HF_TOKEN")
