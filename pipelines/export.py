"""The `export` pipeline: merge, verify, export and publish the adapter of an earlier finetune run, without
retraining. The same `merge_and_push` step runs on that run's artifacts (by id: 4-bit base, trained adapter,
prepared data, eval and training reports), with the earlier run's config but for the `export` section,
which comes from this invocation. No promotion gate: exporting a chosen run is the decision.
"""

from zenml import pipeline

from llmtune.config import RunConfig
from pipelines.finetune import artifact
from steps import merge_and_push
from steps.tracking import leave_user_error


@pipeline(name="export", on_failure=leave_user_error)
def export(config: dict, source: dict[str, str], training_run: str) -> None:
    """`source`: the artifact ids of the finetune run's base, adapter, data, eval_report and training_report."""
    parts = {name: artifact(source.get(name)) for name in ("base", "adapter", "data", "eval_report", "training_report")}
    merge_and_push(
        parts["base"],
        parts["adapter"],
        parts["data"],
        parts["eval_report"],
        parts["training_report"],
        RunConfig.model_validate(config),
        training_run=training_run,
    )
