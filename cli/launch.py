"""Launch a pipeline on the active stack from the CLI: resolve what it starts from, run it, print the summary.

`LAUNCHERS[name](cfg, enable_cache) -> exit code` for the pipelines `run.py` offers. The lookups in the ZenML
store (an earlier run's artifacts, the production champion) happen here, and the pipelines get ids.

Example:
    >>> sorted(LAUNCHERS)
    ['evaluate', 'export', 'finetune', 'prepare']
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from zenml import Model
from zenml.client import Client

from cli.sources import FINETUNE, Champion, find_champion, find_finetune_run, run_artifact_ids, run_config, step_output
from cli.stack import run_options
from cli.summary import print_gate_preview, print_summary
from llmtune.artifacts import Adapter
from llmtune.config import ConfigError, RunConfig
from llmtune.model.hf import PickleWeightsRefused


def finished(run: Any) -> Any:
    """The run a pipeline call returned (ZenML returns None only for a scheduled or remote-async run)."""
    if run is None:
        raise RuntimeError("The pipeline returned no run; it was scheduled or runs asynchronously on the stack.")
    return run


def zenml_model(cfg: RunConfig, version: str | int | None = None) -> Model | None:
    """The ZenML Model a run joins (a new version unless `version` names one), or None when unset."""
    if not cfg.export.zenml_model:
        return None
    return Model(
        name=cfg.export.zenml_model,
        version=version,
        description=f"QLoRA fine-tunes of {cfg.model.name} on {cfg.data.describe()} (llmtune).",
        tags=["llmtune", "qlora"],
    )


def launch_finetune(cfg: RunConfig, enable_cache: bool) -> int:
    """Run `finetune` against production (when there is one) and print the end-of-run summary."""
    from pipelines.finetune import finetune

    # run_options: a cloud recipe's run config (Docker image, GPU only for the steps that need one)
    options = {"enable_cache": enable_cache, "model": zenml_model(cfg), **run_options()}
    champion = find_champion(cfg)
    if champion is not None:
        how = "re-scored on this run's eval rows" if champion.adapter else "its recorded scores (another base)"
        print(f"Promotion gate: production is version {champion.version}, {how}.", flush=True)
    run_name = new_run_name("finetune")
    try:
        run = finished(
            finetune.with_options(run_name=run_name, **options)(
                config=cfg.model_dump(),
                champion=champion.describe() if champion else None,
                champion_version=champion.version if champion else None,
            )
        )
    except BaseException:  # a failed or interrupted run: its model version would only use up a number
        release_model_version(run_name)
        raise
    print_summary(run.id)
    return 0


def new_run_name(pipeline: str) -> str:
    """A run name in ZenML's default format (finetune-2026_12_01-13_51_58_246634), chosen here so that the CLI
    can find its run when the pipeline call raises instead of returning it."""
    return f"{pipeline}-{datetime.now(UTC):%Y_%m_%d-%H_%M_%S_%f}"


def release_model_version(run_name: str) -> None:
    """Delete the ZenML model version that the failed run `run_name` created, so the next run gets its number
    (ZenML numbers a new version max + 1). Kept when another run uses it, or when the run got as far as a trained
    adapter (a failed export or push): that version holds the adapter and its scores, and the export pipeline
    joins it. The failed run itself stays listed, without a version."""
    client = Client()
    try:
        run = client.get_pipeline_run(run_name)
    except KeyError:  # the run never started (an error before the orchestrator created it)
        return
    version, trained = run.model_version, run.steps.get("train_sft")
    if run.status.value not in ("failed", "stopped"):  # e.g. still running on a remote orchestrator
        return
    if version is None or set(version.pipeline_run_ids) - {run_name}:
        return
    if trained is not None and trained.status.value in ("completed", "cached"):
        return
    client.delete_model_version(version.id)
    print(
        f"ZenML model {version.model.name}: version {version.number} of the failed run {run_name} was deleted, so "
        "the next run gets its number.",
        flush=True,
    )


def launch_prepare(cfg: RunConfig, enable_cache: bool) -> int:
    """Run `prepare` and print what it did: counts, drops by reason, token lengths, a marked example."""
    from llmtune.data import report
    from pipelines.prepare import prepare

    run = finished(prepare.with_options(enable_cache=enable_cache)(config=cfg.model_dump()))
    finished_run = Client().get_pipeline_run(run.id)
    step = finished_run.steps["prepare_dataset"]
    prepared = step_output(finished_run, "prepare_dataset").load()
    report.print_report(prepared.stats())
    print(f"Prepared data: {prepared.path}\nZenML run:     {run.name} (step status: {step.status.value})")
    return 0


def launch_export(cfg: RunConfig, enable_cache: bool) -> int:
    """Export the chosen earlier finetune run (no training, no gate) and print the summary."""
    from pipelines.export import export

    source = find_finetune_run(cfg.source, cfg.export.zenml_model)
    print(f"Exporting the adapter of {FINETUNE} run {source.name} (no training).", flush=True)
    # the export joins the earlier run's ZenML Model version, so that version lists both
    known = source.model_version
    model = Model(name=known.model.name, version=known.number) if known is not None else None
    config = run_config(source).model_copy(update={"export": cfg.export})
    run = finished(
        export.with_options(enable_cache=enable_cache, model=model, **run_options())(
            config=config.model_dump(), source=run_artifact_ids(source), training_run=source.name
        )
    )
    print_summary(run.id)
    return 0


def launch_evaluate(cfg: RunConfig, enable_cache: bool) -> int:
    """Evaluate the chosen adapter and print the summary and the gate's would-be verdict."""
    from pipelines.evaluate import evaluate_adapter

    cfg, source = evaluation_source(cfg)
    what = f"finetune run {source.name}" if source is not None else f"adapter {Path(str(cfg.source.adapter))}"
    print(f"Evaluating {what} (no training).", flush=True)
    champion, itself = find_champion(cfg), None
    if champion is not None and source is not None and is_champion_run(champion, source):
        itself = champion.version
        print(f"It is production version {itself} itself: not compared with production.")
        champion = None
    run = finished(
        evaluate_adapter.with_options(enable_cache=enable_cache, **run_options())(
            config=cfg.model_dump(),
            source=run_artifact_ids(source) if source is not None else None,
            champion=champion.describe() if champion else None,
        )
    )
    print_summary(run.id, champion_version=champion.version if champion else None)
    print_gate_preview(run.id, cfg.promotion, champion.version if champion else None, itself=itself)
    return 0


def evaluation_source(cfg: RunConfig) -> tuple[RunConfig, Any]:
    """The config to evaluate with and the finetune run it starts from (None for `source.adapter`)."""
    if cfg.source.adapter:
        try:
            adapter_config = Adapter(cfg.source.adapter).config()
        except PickleWeightsRefused as err:
            raise ConfigError(f"source.adapter: {err}") from None
        trained_on = adapter_config.get("base_model_name_or_path")
        if trained_on and trained_on != cfg.model.name:
            print(f"Note: the adapter names '{trained_on}' as its base; evaluating it on model.name={cfg.model.name}.")
        return cfg, None
    run = find_finetune_run(cfg.source, cfg.export.zenml_model)
    updates = {"evaluation": cfg.evaluation, "promotion": cfg.promotion, "export": cfg.export, "source": cfg.source}
    return run_config(run).model_copy(update=updates), run


def is_champion_run(champion: Champion, source: Any) -> bool:
    return source.model_version is not None and str(source.model_version.number) == champion.version


LAUNCHERS: dict[str, Callable[[RunConfig, bool], int]] = {
    "finetune": launch_finetune,
    "export": launch_export,
    "evaluate": launch_evaluate,
    "prepare": launch_prepare,
}
