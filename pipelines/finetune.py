"""The `finetune` pipeline: prepare -> 4-bit load -> LoRA -> SFT -> evaluate -> merge/export/publish.

Each step gets only its own config section, so changing a training hyperparameter re-runs
train_sft and what follows, and reuses the cached data, base model and initial adapter. With
`export.zenml_model` set, each run is a new version of that ZenML Model (Model Control Plane), and
the run's artifacts and the merge check and publishing results are attached to it.
"""

from zenml import Model, pipeline

from llmtune.config import ExportConfig, RunConfig
from llmtune.data import source_fingerprint
from steps import evaluate, inject_lora, load_base_model, merge_and_push, prepare_dataset, train_sft


@pipeline(name="finetune")
def finetune(config: dict) -> None:
    cfg = RunConfig.model_validate(config)
    backend = cfg.model.backend
    data = prepare_dataset(
        cfg.data,
        tokenizer_source=cfg.model.name,
        trust_remote_code=cfg.model.trust_remote_code,
        source_fingerprint=source_fingerprint(cfg.data.source),
    )
    base = load_base_model(cfg.model)
    initial = inject_lora(base, cfg.lora, backend=backend)
    adapter = train_sft(base, initial, data, cfg.training, backend=backend, max_seq_length=cfg.data.max_seq_length)
    report = evaluate(base, adapter, data, cfg.evaluation, backend=backend)
    merge_and_push(base, adapter, data, report, cfg.export, model_cfg=cfg.model, resolved_config=cfg.to_yaml())


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
    from pipelines.stack import run_options
    from pipelines.summary import print_summary

    # run_options: a cloud recipe's run config (Docker image, GPU only for the steps that need one)
    options = {"enable_cache": enable_cache, "model": zenml_model(cfg), **run_options()}
    run = finetune.with_options(**options)(config=cfg.model_dump())
    print_summary(run.id)
    return 0
