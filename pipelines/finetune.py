"""The `finetune` pipeline: prepare -> 4-bit load -> LoRA -> SFT -> evaluate -> gate, merge/export/publish, promote.

Each step gets only its own config section, so changing a training hyperparameter re-runs
train_sft and what follows, and reuses the cached data, base model and initial adapter. With
`export.zenml_model` set, each run is a new version of that ZenML Model (Model Control Plane), and
the run's artifacts, scores, gate verdict, merge check and publishing results are attached to it.

The promotion gate (`promotion` section) compares tuned with base and with the model's current
production version, which `launch` looks up and the evaluate step re-scores on the same held-out
rows; a run that passes is promoted to `promotion.promote_to`, one that fails is not merged or published.
"""

from typing import Any

from zenml import Model, pipeline

from llmtune.config import ExportConfig, RunConfig
from llmtune.data import source_fingerprint
from steps import evaluate, inject_lora, load_base_model, merge_and_push, prepare_dataset, train_sft


@pipeline(name="finetune")
def finetune(config: dict, champion: dict | None = None, champion_version: str | None = None) -> None:
    cfg = RunConfig.model_validate(config)
    champion_adapter = champion_adapter_artifact(champion)
    backend = cfg.model.backend
    data = prepared_data(cfg)
    base = load_base_model(cfg.model)
    initial = inject_lora(base, cfg.lora, backend=backend)
    adapter = train_sft(base, initial, data, cfg.training, backend=backend, max_seq_length=cfg.data.max_seq_length)
    report = evaluate(
        base, adapter, data, cfg.evaluation, backend=backend, champion=champion, champion_adapter=champion_adapter
    )
    merge_and_push(
        base,
        adapter,
        data,
        report,
        cfg.export,
        model_cfg=cfg.model,
        resolved_config=cfg.to_yaml(),
        gate=cfg.promotion,
        champion_version=champion_version,
        champion_adapter_id=champion["adapter_artifact_id"] if champion else None,
    )


def prepared_data(cfg: RunConfig) -> Any:
    """The prepare step, keyed on the data's bytes too, so edited data at the same path is not a cache hit."""
    return prepare_dataset(
        cfg.data,
        tokenizer_source=cfg.model.name,
        trust_remote_code=cfg.model.trust_remote_code,
        source_fingerprint=source_fingerprint(cfg.data.source),
    )


def champion_adapter_artifact(champion: dict | None) -> Any:
    """The production version's adapter artifact, when it is to be re-scored (see pipelines.sources.Champion)."""
    if not champion or not champion.get("adapter_artifact_id"):
        return None
    from zenml.client import Client

    return Client().get_artifact_version(champion["adapter_artifact_id"])


def zenml_model(cfg: RunConfig, version: str | int | None = None) -> Model | None:
    """The ZenML Model a run joins (a new version unless `version` names one), or None when unset."""
    export: ExportConfig = cfg.export
    if not export.zenml_model:
        return None
    return Model(
        name=export.zenml_model,
        version=version,
        description=f"QLoRA fine-tunes of {cfg.model.name} on {cfg.data.source} (llmtune).",
        tags=["llmtune", "qlora"],
    )


def launch(cfg: RunConfig, enable_cache: bool) -> int:
    """Run `finetune` on the active stack and print the end-of-run summary; the CLI's entry point."""
    from pipelines.sources import find_champion
    from pipelines.stack import run_options
    from pipelines.summary import print_summary

    # run_options: a cloud recipe's run config (Docker image, GPU only for the steps that need one)
    options = {"enable_cache": enable_cache, "model": zenml_model(cfg), **run_options()}
    champion = find_champion(cfg)
    if champion is not None:
        how = "re-scored on this run's eval rows" if champion.adapter else "its recorded scores (another base)"
        print(f"Promotion gate: production is version {champion.version}, {how}.", flush=True)
    run = finetune.with_options(**options)(
        config=cfg.model_dump(),
        champion=champion.describe() if champion else None,
        champion_version=champion.version if champion else None,
    )
    print_summary(run.id)
    return 0
