"""Step 6: merge onto the 16-bit base, verify, export the formats with a model card, then publish.

Order matters: the merge check result is logged before anything is written, a failed check stops
the step before any export, and the local export is complete before any push, so a failed push
leaves it intact. Secrets are resolved here (never in llmtune/). Not cached: publishing is a side
effect that must happen on every run that asks for it.
"""

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import mlflow
from transformers import AutoTokenizer
from zenml import get_step_context, log_metadata, step

from llmtune import export as exporting
from llmtune import model_card, publish
from llmtune.artifacts import Adapter, MergedModel, PreparedData, QuantizedBase
from llmtune.config import ExportConfig, ModelConfig
from llmtune.data import read_eval_prompts
from steps._record import record, section_params


@step(experiment_tracker=True, enable_cache=False)
def merge_and_push(
    base: QuantizedBase,
    adapter: Adapter,
    data: PreparedData,
    eval_report: dict[str, Any],
    cfg: ExportConfig,
    model_cfg: ModelConfig,
    resolved_config: str,
    training_run: str | None = None,
) -> tuple[Annotated[MergedModel, "merged_model"], Annotated[dict[str, Any], "export_report"]]:
    tokenizer = AutoTokenizer.from_pretrained(Path(data.path) / "tokenizer")
    prompts = [p["prompt"] for p in read_eval_prompts(data.path)]
    job = exporting.ExportJob(model_cfg, Path(base.path), Path(adapter.path), tokenizer, prompts)
    work = Path(tempfile.mkdtemp(prefix="llmtune-export-"))
    merged_dir, check = exporting.merge_and_check(job, cfg, work)
    record(
        metadata=check,
        params=section_params("export", cfg),
        metrics={"merge_check_max_logit_gap": check["merge_check_max_logit_gap"]},
    )
    exporting.ensure_passed(check)
    folders = exporting.write_formats(job, cfg, merged_dir, work)
    facts = _card_facts(cfg, model_cfg, data, adapter, eval_report, check, resolved_config, training_run)
    _annotate(folders, facts, resolved_config)
    report = {**check, **_write_local(cfg, folders)}
    report.update(_publish(cfg, folders[cfg.publish_format], eval_report, facts))
    destinations = {k: v for k, v in report.items() if k not in check}
    if destinations:
        log_metadata(metadata=destinations)
    if get_step_context().model_version is not None:  # the Model Control Plane: the version carries the results
        log_metadata(metadata={**check, **destinations}, infer_model=True)
    if mlflow.active_run() is not None:
        mlflow.log_text(resolved_config, "config.yaml")
    return MergedModel(str(merged_dir)), report


def _card_facts(
    cfg: ExportConfig,
    model_cfg: ModelConfig,
    data: PreparedData,
    adapter: Adapter,
    eval_report: dict[str, Any],
    check: dict[str, Any],
    resolved_config: str,
    training_run: str | None,
) -> model_card.CardFacts:
    stats = json.loads((Path(data.path) / "stats.json").read_text())
    training_file = Path(adapter.path) / "training_report.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    training.pop("loss_history", None)
    return model_card.CardFacts(
        kind="adapter",
        base_model=model_cfg.name,
        base_revision=model_cfg.revision,
        repo_id=cfg.hub_repo_id,
        dataset=_data_source(resolved_config),
        dataset_fingerprint=stats["fingerprint"],
        resolved_config=resolved_config,
        eval_report=eval_report,
        training_report=training,
        hardware=training.get("hardware") or f"{model_card.describe_hardware()} (the export machine)",
        merge_check={k: v for k, v in check.items() if k.startswith(("merge_check_", "vs_trained"))},
        trail=_trail(training_run),
    )


def _data_source(resolved_config: str) -> str:
    import yaml

    return str(yaml.safe_load(resolved_config)["data"]["source"])


def _trail(training_run: str | None) -> dict[str, str]:
    run = get_step_context().pipeline_run
    active = mlflow.active_run()
    return {
        "zenml_run": run.name,
        "zenml_run_id": str(run.id),
        "training_run": training_run or run.name,
        "mlflow_run_id": active.info.run_id if active else "",
    }


def _annotate(folders: dict[str, Path], facts: model_card.CardFacts, resolved_config: str) -> None:
    """A model card and the resolved config in every exported folder."""
    for kind, folder in folders.items():
        (folder / "README.md").write_text(model_card.render_model_card(replace(facts, kind=kind)))
        (folder / "llmtune_config.yaml").write_text(resolved_config)


def _write_local(cfg: ExportConfig, folders: dict[str, Path]) -> dict[str, str]:
    if not cfg.output_dir:
        return {}
    dest = Path(cfg.output_dir) / get_step_context().pipeline_run.name
    paths = {kind: exporting.copy_tree(folder, dest / folder.name).resolve() for kind, folder in folders.items()}
    return {f"{kind}_path": str(path) for kind, path in paths.items()} | {
        # the names the run summary has always printed
        "adapter_path": str(paths.get("adapter", "")),
        "merged_path": str(paths.get("merged_16bit", "")),
    }


def _publish(cfg: ExportConfig, folder: Path, eval_report: dict[str, Any], facts: model_card.CardFacts) -> dict:
    if not (cfg.hub_repo_id or cfg.mlflow_registered_model):
        return {}
    if cfg.require_improvement and not eval_report.get("tuned_beats_base", False):
        raise publish.PublishError(
            "Not publishing: the tuned eval loss does not beat the base's (export.require_improvement=true). "
            "The local export, if any, is written."
        )
    done: dict[str, Any] = {}
    if cfg.mlflow_registered_model:
        done.update(_register(cfg.mlflow_registered_model, folder, facts, cfg.publish_format))
    if cfg.hub_repo_id:
        trail = facts.trail
        message = publish.commit_message(trail["training_run"], trail["zenml_run_id"], trail["mlflow_run_id"])
        token = _hub_token(cfg)
        url = publish.push_to_hub(folder, cfg.hub_repo_id, token, cfg.hub_private, message, cfg.hub_endpoint)
        done["hub_commit_url"] = url
    return done


def _register(name: str, folder: Path, facts: model_card.CardFacts, kind: str) -> dict[str, Any]:
    active = mlflow.active_run()
    if active is None:
        raise publish.PublishError("export.mlflow_registered_model needs the stack's MLflow experiment tracker.")
    tags = {
        **facts.trail,
        "format": kind,
        "dataset": facts.dataset,
        "dataset_fingerprint": facts.dataset_fingerprint,
        "base_model": facts.base_model,
        "base_model_revision": facts.base_revision or "",
        "merge_check_max_logit_gap": str(facts.merge_check.get("merge_check_max_logit_gap")),
    }
    return publish.register_in_mlflow(folder, name, active.info.run_id, tags, mlflow.get_tracking_uri())


def _hub_token(cfg: ExportConfig) -> str | None:
    if cfg.hub_token_secret:
        from zenml.client import Client

        return Client().get_secret(cfg.hub_token_secret).secret_values.get("token")
    return os.environ.get("HF_TOKEN")
