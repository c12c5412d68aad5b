"""The end-of-run summary: step status and time, base vs tuned, where the outputs are, how to look further."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from zenml.client import Client

from pipelines.stack import mlflow_tracking_uri

EXPERIMENT = "finetune"


def step_output(run: Any, step: str, name: str) -> Any:
    """Load one named output artifact of a step of a finished run."""
    outputs = run.steps[step].outputs[name]
    return (outputs[0] if isinstance(outputs, list) else outputs).load()


def mlflow_run_id(run_name: str, experiment: str = EXPERIMENT) -> str | None:
    import mlflow

    mlflow.set_tracking_uri(mlflow_tracking_uri())
    found = mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"tags.mlflow.runName = '{run_name}'", output_format="list"
    )
    return found[0].info.run_id if found else None


def print_summary(run_id: Any, console: Console | None = None) -> None:
    console = console or Console()
    run = Client().get_pipeline_run(run_id)
    console.print(_steps_table(run))
    if run.status.value != "completed":
        console.print(f"[red]Run {run.name} ended {run.status.value}.[/red] See the step logs above.")
        return
    if "evaluate" in run.steps:
        console.print(_metrics_table(step_output(run, "evaluate", "eval_report")))
    export = step_output(run, "merge_and_push", "export_report")
    experiment = run.pipeline.name if run.pipeline else EXPERIMENT  # the tracker names experiments after pipelines
    lines = [
        *_export_lines(export),
        f"MLflow:       experiment '{experiment}', run {mlflow_run_id(run.name, experiment)}",
        f"  open the UI:  mlflow ui --backend-store-uri {mlflow_tracking_uri()}",
        f"ZenML:        run {run.name}",
        "  dashboard:    zenml login --local   (then open the printed URL)",
    ]
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def _export_lines(export: dict[str, Any]) -> list[str]:
    """Where the exported formats went, with the merge check that let them out."""
    check = (
        f"merge check: max logit gap {export['merge_check_max_logit_gap']} <= {export['merge_check_atol']}, "
        f"greedy answers identical on all but {export.get('merge_check_greedy_near_tie_flips', 0)} near ties"
    )
    lines = [
        f"Adapter:      {export.get('adapter_path') or '(not exported locally)'}",
        f"Merged model: {export.get('merged_path') or '(not exported locally)'}  ({check})",
    ]
    if export.get("merged_4bit_path"):
        lines.append(f"Merged 4-bit: {export['merged_4bit_path']}")
    if export.get("hub_commit_url"):
        lines.append(f"Hub:          {export['hub_commit_url']}")
    if export.get("mlflow_registered_model"):
        lines.append(
            f"Registry:     MLflow model '{export['mlflow_registered_model']}' version {export['mlflow_model_version']}"
        )
    return lines


def _steps_table(run: Any) -> Table:
    table = Table(title=f"Pipeline run {run.name}")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for name, step in run.steps.items():
        seconds = (step.end_time - step.start_time).total_seconds() if step.end_time and step.start_time else None
        table.add_row(name, step.status.value, f"{seconds:.1f}" if seconds is not None else "-")
    return table


def _metrics_table(report: dict[str, Any]) -> Table:
    table = Table(
        title=f"Base vs tuned ({report['eval_rows']} eval rows, {report['generation_prompts']} generation prompts)"
    )
    for column in ("metric", "base", "tuned"):
        table.add_column(column)
    judge = ["judge_score"] if "base_judge_score" in report else []
    for metric in ("eval_loss", "perplexity", *report.get("metrics", ["exact_match"]), *judge):
        table.add_row(metric, f"{report[f'base_{metric}']:.4g}", f"{report[f'tuned_{metric}']:.4g}")
    return table
