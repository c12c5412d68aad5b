"""Step 6: the promotion gate, then merge onto the 16-bit base, verify, export with a model card, publish, promote.

Order matters: a run that fails the promotion gate stops here with its verdict recorded, before any
merge; so does a run whose adapter is production's own (a scheduled run on unchanged data and config).
The merge check result is logged before anything is written, a failed check stops the step before any
export, the local export is complete before any push (so a failed push leaves it intact), and the
ZenML Model version is promoted only after everything asked for has been published. Secrets are
resolved here (never in llmtune/). Not cached: publishing is a side effect that must happen on every
run that asks for it.
"""

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import mlflow
from transformers import AutoTokenizer
from zenml import get_step_context, log_metadata, save_artifact, step
from zenml.enums import ArtifactType

from llmtune import export as exporting
from llmtune import model_card, promotion, publish
from llmtune.artifacts import Adapter, MergedModel, PreparedData, QuantizedBase
from llmtune.config import ExportConfig, ModelConfig, PromotionConfig
from llmtune.data import read_eval_prompts
from steps._record import log_run_config_params, record


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
    gate: PromotionConfig | None = None,
    champion_version: str | None = None,
    champion_adapter_id: str | None = None,
) -> Annotated[dict[str, Any], "export_report"]:
    log_run_config_params(resolved_config)
    if gate is not None and champion_adapter_id and _input_id("adapter") == champion_adapter_id:
        return _unchanged(champion_version)
    verdict = _apply_gate(gate, eval_report, champion_version)
    if verdict is not None and not verdict.passed:
        print(verdict.text, flush=True)
        return verdict.as_metadata()
    tokenizer = AutoTokenizer.from_pretrained(Path(data.path) / "tokenizer")
    prompts = [p["prompt"] for p in read_eval_prompts(data.path)]
    job = exporting.ExportJob(model_cfg, Path(base.path), Path(adapter.path), tokenizer, prompts)
    work = Path(tempfile.mkdtemp(prefix="llmtune-export-"))
    merged_dir, check = exporting.merge_and_check(job, cfg, work)
    record(metadata=check, metrics={"merge_check_max_logit_gap": check["merge_check_max_logit_gap"]})
    exporting.ensure_passed(check)
    # a tracked artifact (linked to the step and the model version), written only when the merge passed
    save_artifact(MergedModel(str(merged_dir)), name="merged_model", artifact_type=ArtifactType.MODEL)
    folders = exporting.write_formats(job, cfg, merged_dir, work)
    facts = _card_facts(cfg, model_cfg, data, adapter, eval_report, check, resolved_config, training_run)
    _annotate(folders, facts, resolved_config)
    report = {**check, **_write_local(cfg, folders)}
    report.update(_publish(cfg, folders[cfg.publish_format], facts))
    if verdict is not None:
        report.update(verdict.as_metadata())
        report.update(_promote(verdict, report))
        print(verdict.text, flush=True)
    destinations = {k: v for k, v in report.items() if k not in check}
    if destinations:
        log_metadata(metadata=destinations)
    if get_step_context().model_version is not None:  # the Model Control Plane: the version carries the results
        log_metadata(metadata={**check, **destinations}, infer_model=True)
    if mlflow.active_run() is not None:
        mlflow.log_text(resolved_config, "config.yaml")
    return report


def _apply_gate(
    gate: PromotionConfig | None, eval_report: dict[str, Any], champion_version: str | None
) -> promotion.Verdict | None:
    """Decide, and record the verdict on the step, the model version and the MLflow run, whichever way it goes."""
    if gate is None:
        return None
    verdict = promotion.decide(eval_report, gate, champion_version)
    facts = verdict.as_metadata()
    log_metadata(metadata=facts)
    if get_step_context().model_version is not None:
        log_metadata(metadata=facts, infer_model=True)
    if mlflow.active_run() is not None:
        mlflow.set_tags({"llmtune.verdict": "promoted" if verdict.passed else "rejected", "llmtune.gate": verdict.text})
    return verdict


def _input_id(name: str) -> str:
    return str(get_step_context().inputs[name][0].id)


def _unchanged(champion_version: str | None) -> dict[str, Any]:
    """A run whose (cached) adapter is production's own: a scheduled run on unchanged data and config."""
    text = (
        f"UNCHANGED: this run's adapter is production version {champion_version}'s (same data and config, training "
        "cached); nothing merged, published or promoted."
    )
    print(text, flush=True)
    facts = {"gate_verdict": text, "gate_unchanged": True}
    log_metadata(metadata=facts)
    if mlflow.active_run() is not None:
        mlflow.set_tags({"llmtune.verdict": "unchanged", "llmtune.gate": text})
    return facts


def _promote(verdict: promotion.Verdict, report: dict[str, Any]) -> dict[str, Any]:
    """Move the run's ZenML Model version (and its MLflow registry version, if any) to the configured stage."""
    stage = verdict.promote_to
    model_version = get_step_context().model_version
    if not stage or model_version is None:
        return {}
    model_version.set_stage(stage, force=True)  # force: the version that held the stage is moved out of it
    done: dict[str, Any] = {"promoted_to": stage, "promoted_version": str(model_version.number)}
    if report.get("mlflow_registered_model"):
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(report["mlflow_registered_model"], stage, str(report["mlflow_model_version"]))
    return done


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


def _publish(cfg: ExportConfig, folder: Path, facts: model_card.CardFacts) -> dict:
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
