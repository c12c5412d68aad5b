"""The `export` pipeline: merge, verify, export and publish the adapter of an earlier finetune run, without
retraining. It runs the same `merge_and_push` step on that run's artifacts (4-bit base, trained adapter,
prepared data, eval report), with the earlier run's config for everything but the `export` section,
which comes from this invocation.

    python run.py --pipeline export                                   # the latest completed finetune run
    python run.py --pipeline export --set source.run=finetune-2026_...
    python run.py --pipeline export --set source.model_version=production --set export.formats=[adapter,merged_4bit]

No promotion gate here: exporting a chosen run is an explicit decision.
"""

from __future__ import annotations

from typing import Any

from zenml import Model, pipeline
from zenml.client import Client

from llmtune.config import ExportConfig, RunConfig
from pipelines.sources import FINETUNE, find_finetune_run, run_config, step_output
from steps import merge_and_push


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
    return run_config(run).model_copy(update={"export": export_cfg})


def launch(cfg: RunConfig, enable_cache: bool) -> int:
    """Export the chosen earlier run and print the summary; the CLI's entry point."""
    from pipelines.summary import print_summary

    source = find_finetune_run(cfg.source, cfg.export.zenml_model)
    print(f"Exporting the adapter of {FINETUNE} run {source.name} (no training).", flush=True)
    # the export joins the earlier run's ZenML Model version, so that version lists both
    known = source.model_version
    model = Model(name=known.model.name, version=known.number) if known is not None else None
    from pipelines.stack import run_options

    run = export.with_options(enable_cache=enable_cache, model=model, **run_options())(
        source_run_id=str(source.id), export_config=cfg.export.model_dump()
    )
    print_summary(run.id)
    return 0
