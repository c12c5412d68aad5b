"""The `export` pipeline: merge, verify, export and publish the adapter of an earlier finetune run, without
retraining. It runs the same `merge_and_push` step on that run's artifacts (4-bit base, trained adapter,
prepared data, eval report), with the earlier run's config for everything but the `export` section,
which comes from this invocation.

    python run.py --pipeline export                                   # the latest completed finetune run
    python run.py --pipeline export --set export.source_run=finetune-2026_...
    python run.py --pipeline export --set export.source_model_version=3 --set export.formats=[adapter,merged_4bit]
"""

from __future__ import annotations

from typing import Any

from zenml import Model, pipeline
from zenml.client import Client

from llmtune.config import ConfigError, ExportConfig, RunConfig
from steps import merge_and_push

SOURCE_PIPELINE = "finetune"


@pipeline(name="export")
def export(source_run_id: str, export_config: dict) -> None:
    run = Client().get_pipeline_run(source_run_id)
    cfg = source_config(run, ExportConfig.model_validate(export_config))
    merge_and_push(
        step_output(run, "load_base_model"),
        step_output(run, "train_sft"),
        step_output(run, "prepare_dataset"),
        step_output(run, "evaluate", "eval_report"),
        cfg.export,
        model_cfg=cfg.model,
        resolved_config=cfg.to_yaml(),
        training_run=run.name,
    )


def source_config(run: Any, export_cfg: ExportConfig) -> RunConfig:
    """The earlier run's config with this invocation's export section."""
    earlier = RunConfig.model_validate((run.config.parameters or {})["config"])
    return earlier.model_copy(update={"export": export_cfg})


def step_output(run: Any, step: str, name: str = "output") -> Any:
    """An output artifact version of a step of `run`; passed to a step, ZenML loads it as that step's input."""
    outputs = run.steps[step].outputs[name]
    return outputs[0] if isinstance(outputs, list) else outputs


def find_source_run(cfg: ExportConfig) -> Any:
    """The finetune run to export: export.source_model_version, else export.source_run, else the latest."""
    client = Client()
    if cfg.source_model_version:
        if not cfg.zenml_model:
            raise ConfigError("export.source_model_version needs export.zenml_model (the model's name).")
        version = client.get_model_version(cfg.zenml_model, cfg.source_model_version)
        runs = [r for r in version.pipeline_runs.values() if _is_completed_finetune(r)]
        if not runs:
            raise ConfigError(
                f"Model {cfg.zenml_model} version {cfg.source_model_version} has no completed finetune run."
            )
        return max(runs, key=lambda r: r.created)
    if cfg.source_run:
        run = client.get_pipeline_run(cfg.source_run)
        if not _is_completed_finetune(run):
            raise ConfigError(f"export.source_run '{cfg.source_run}' is not a completed {SOURCE_PIPELINE} run.")
        return run
    latest = client.list_pipeline_runs(
        pipeline_name=SOURCE_PIPELINE, status="completed", sort_by="desc:created", size=1
    )
    if not latest.items:
        raise ConfigError(
            f"No completed {SOURCE_PIPELINE} run to export. Run `python run.py --pipeline finetune` first, "
            f"or set export.source_run."
        )
    return latest.items[0]


def _is_completed_finetune(run: Any) -> bool:
    return run.pipeline is not None and run.pipeline.name == SOURCE_PIPELINE and run.status.value == "completed"


def launch(cfg: RunConfig, enable_cache: bool) -> int:
    """Export the chosen earlier run and print the summary; the CLI's entry point."""
    from pipelines.summary import print_summary

    source = find_source_run(cfg.export)
    print(f"Exporting the adapter of {SOURCE_PIPELINE} run {source.name} (no training).", flush=True)
    # the export joins the earlier run's ZenML Model version, so that version lists both
    known = source.model_version
    model = Model(name=known.model.name, version=known.number) if known is not None else None
    from pipelines.stack import run_options

    run = export.with_options(enable_cache=enable_cache, model=model, **run_options())(
        source_run_id=str(source.id), export_config=cfg.export.model_dump()
    )
    print_summary(run.id)
    return 0
