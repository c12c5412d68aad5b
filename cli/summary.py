"""The end-of-run summary: step status and time, base vs tuned, where the outputs are, how to look further."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from zenml.client import Client

from cli import sources
from cli.stack import mlflow_tracking_uri
from llmtune.data import report

EXPERIMENT = "finetune"


def step_output(run: Any, step: str, name: str | None = None) -> Any:
    """Load one named output artifact of a step of a finished run."""
    return sources.step_output(run, step, name).load()


def mlflow_run_id(run_name: str, experiment: str = EXPERIMENT) -> str | None:
    import mlflow

    mlflow.set_tracking_uri(mlflow_tracking_uri())
    found = mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"tags.mlflow.runName = '{run_name}'", output_format="list"
    )
    return found[0].info.run_id if found else None


def _runs_view_lines(experiment: str) -> list[str]:
    """The link to the experiment's runs table with the key columns (the view the pipeline saves)."""
    import mlflow

    from steps.tracking import runs_view_url

    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [f"  then open:    {runs_view_url('http://127.0.0.1:5000', found.experiment_id)}"]


def print_summary(run_id: Any, console: Console | None = None, champion_version: str | None = None) -> None:
    """Steps, base vs tuned (and production), where the outputs went; `champion_version` names production when
    the run has no gate of its own to say it (the evaluate pipeline)."""
    console = console or Console()
    run = Client().get_pipeline_run(run_id)
    console.print(_steps_table(run))
    if run.status.value != "completed":
        console.print(f"[red]Run {run.name} ended {run.status.value}.[/red] See the step logs above.")
        return
    export = step_output(run, "merge_and_push", "export_report") if "merge_and_push" in run.steps else {}
    verdict = step_output(run, "promotion_gate", "verdict") if "promotion_gate" in run.steps else {}
    if "evaluate" in run.steps:
        production = champion_version or verdict.get("gate_champion_version") or "?"
        console.print(_metrics_table(step_output(run, "evaluate", "eval_report"), production))
    experiment = run.pipeline.name if run.pipeline else EXPERIMENT  # the tracker names experiments after pipelines
    prepared = run.steps.get("prepare_dataset")
    training = step_output(run, "train_sft", "training_report") if "train_sft" in run.steps else None
    lines = [
        *(report.warning_lines(step_output(run, "prepare_dataset").stats()) if prepared else []),
        *(_training_lines(training) if training is not None else []),
        *_gate_lines(verdict, export, run.name),
        *(_export_lines(export) if "merge_check_max_logit_gap" in export else []),
        f"MLflow:       experiment '{experiment}', run {mlflow_run_id(run.name, experiment) or '(none: all cached)'}",
        f"  open the UI:  mlflow ui --backend-store-uri {mlflow_tracking_uri()}",
        *_runs_view_lines(experiment),
        f"ZenML:        run {run.name}",
        "  dashboard:    zenml login --local   (then open the printed URL)",
        *_model_version_lines(run),
    ]
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def print_gate_preview(
    run_id: Any, gate: Any, champion_version: str | None, console: Console | None = None, itself: str | None = None
) -> None:
    """What the promotion gate would decide on an evaluate-only run (nothing is promoted by it); `itself`: the
    production version number when the evaluated adapter is that version (so it was not compared with itself)."""
    from llmtune.release.promotion import decide

    run = Client().get_pipeline_run(run_id)
    if run.status.value != "completed":
        return
    text = decide(step_output(run, "evaluate", "eval_report"), gate, champion_version).text
    if itself is not None:  # there is a production version: this one
        text = text.replace("; no production version yet.", f"; it is production version {itself} itself.")
    (console or Console()).print(
        f"Gate preview (nothing promoted): {text}", soft_wrap=True, markup=False, highlight=False
    )


def _training_lines(training: Any) -> list[str]:
    """Steps and epochs trained, the eval loss, which adapter was kept, and a backend that stood in, if any."""
    lines = [f"Training:     {training.length_line()}"]
    if training.backend_note:
        lines.append(f"Backend:      {training.backend_note}")
    return lines


def _model_version_lines(run: Any) -> list[str]:
    """How to see the run's ZenML Model versions and their stages (the open-source dashboard does not show them)."""
    version = getattr(run, "model_version", None)
    if version is None:
        return []
    model = version.model.name
    return [
        f"  model:        {model} version {version.number}; "
        f"all versions and stages: zenml model version list --model={model}"
    ]


def _gate_lines(verdict: dict[str, Any], export: dict[str, Any], run_name: str) -> list[str]:
    """The promotion gate's verdict, where the model version went, and for a rejected run how to export it anyway
    (its trained adapter stays an artifact of the run)."""
    if "gate_verdict" not in verdict:
        return []
    lines = [f"Gate:         {verdict['gate_verdict']}"]
    if verdict.get("gate_passed") is False:
        lines.append(
            f"Export anyway: python run.py --pipeline export --set source.run={run_name}   "
            "(the trained adapter is kept in ZenML; the export pipeline has no gate)"
        )
    if export.get("promoted_to"):
        lines.append(f"Promoted:     ZenML model version {export['promoted_version']} -> {export['promoted_to']}")
    return lines


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
    if export.get("gguf_path"):
        lines.append(f"GGUF:         {export['gguf_path']}  ({_gguf_check_line(export)})")
    if export.get("hub_commit_url"):
        lines.append(f"Hub:          {export['hub_commit_url']}")
    if export.get("mlflow_registered_model"):
        lines.append(
            f"Registry:     MLflow model '{export['mlflow_registered_model']}' version {export['mlflow_model_version']}"
        )
    return lines


def _gguf_check_line(export: dict[str, Any]) -> str:
    """The GGUF check per type, for the summary.

    >>> _gguf_check_line({"gguf_q8_0_max_logit_gap": 0.03, "gguf_q8_0_atol": 0.5, "gguf_check_passed": True})
    'GGUF check: q8_0 max logit gap 0.03 <= 0.5; ollama create my-model -f Modelfile'
    """
    from llmtune.release.card import gguf_kinds

    gaps = ", ".join(
        f"{k} max logit gap {export[f'gguf_{k}_max_logit_gap']} <= {export[f'gguf_{k}_atol']}"
        for k in gguf_kinds(export)
    )
    return f"GGUF check: {gaps}; ollama create my-model -f Modelfile"


def _steps_table(run: Any) -> Table:
    table = Table(title=f"Pipeline run {run.name}")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for name, step in run.steps.items():
        seconds = (step.end_time - step.start_time).total_seconds() if step.end_time and step.start_time else None
        table.add_row(name, step.status.value, f"{seconds:.1f}" if seconds is not None else "-")
    return table


def _metrics_table(report: dict[str, Any], production: str) -> Table:
    table = Table(
        title=f"Base vs tuned ({report['eval_rows']} eval rows, {report['generation_prompts']} generation prompts)"
    )
    columns = ["base", "tuned"] + (["champion"] if "champion_scored_on" in report else [])
    table.add_column("metric")
    for who in columns:
        heading = f"production v{production}" if who == "champion" else who
        table.add_column(heading)
    judge = ["judge_score"] if "base_judge_score" in report else []
    for metric in ("eval_loss", "perplexity", *report.get("metrics", ["exact_match"]), *judge):
        values = [report.get(f"{who}_{metric}") for who in columns]
        table.add_row(metric, *("-" if v is None else f"{v:.4g}" for v in values))
    return table
