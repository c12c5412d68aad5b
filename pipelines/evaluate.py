"""The `evaluate` pipeline: score an existing adapter against its base (and production) without training.

With a finetune run as the source (`source.run`, `source.model_version`, or the latest run) it reuses that
run's 4-bit base, trained adapter and prepared data, by artifact id; with `source.adapter` (any PEFT
adapter folder in safetensors format) the base and data come from the config. `cli.launch` resolves the
source and the production champion; nothing is promoted, merged or published.
"""

from zenml import pipeline

from llmtune.config import RunConfig
from llmtune.data import source_fingerprint
from pipelines.finetune import artifact, prepared_data
from steps import evaluate, import_adapter, load_base_model
from steps.tracking import leave_user_error


@pipeline(name="evaluate", on_failure=leave_user_error)
def evaluate_adapter(config: dict, source: dict[str, str] | None = None, champion: dict | None = None) -> None:
    """`source`: the artifact ids of a finetune run's `base`, `adapter` and `data`, or None for `source.adapter`."""
    cfg = RunConfig.model_validate(config)
    if source:
        base, adapter, data = artifact(source["base"]), artifact(source["adapter"]), artifact(source["data"])
    else:
        assert cfg.source.adapter is not None
        data = prepared_data(cfg)
        base = load_base_model(cfg.model)
        adapter = import_adapter(cfg.source.adapter, source_fingerprint(cfg.source.adapter))
    champion_adapter = artifact(champion["adapter_artifact_id"] if champion else None)
    evaluate(
        base,
        adapter,
        data,
        cfg.evaluation,
        backend=cfg.model.backend,
        champion=champion,
        champion_adapter=champion_adapter,
    )
