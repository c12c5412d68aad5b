"""The `finetune` pipeline: prepare -> 4-bit load -> LoRA -> SFT -> evaluate -> promotion gate -> merge/export/publish.

Each step gets only its own config section, so changing a training hyperparameter re-runs
train_sft and what follows, and reuses the cached data, base model and initial adapter. With
`export.zenml_model` set, each run is a new version of that ZenML Model (Model Control Plane), and
the run's artifacts, scores, gate verdict, merge check and publishing results are attached to it.

The promotion gate (`promotion` section) compares tuned with base and with the model's current
production version (`champion`, looked up by the CLI before the run), which the evaluate step
re-scores on the same held-out rows; a run that passes is released and promoted to
`promotion.promote_to`, one that fails is not merged or published.
"""

from typing import Any

from zenml import pipeline
from zenml.client import Client

from llmtune.config import RunConfig
from llmtune.data import sources_fingerprint
from llmtune.data.templates import tokenizer_cache_key
from steps import evaluate, inject_lora, load_base_model, merge_and_push, prepare_dataset, promotion_gate, train_sft
from steps.tracking import leave_user_error


@pipeline(name="finetune", on_failure=leave_user_error)
def finetune(config: dict, champion: dict | None = None, champion_version: str | None = None) -> None:
    cfg = RunConfig.model_validate(config)
    backend = cfg.model.backend
    data = prepared_data(cfg)
    base = load_base_model(cfg.model)
    initial = inject_lora(base, cfg.lora, backend=backend)
    adapter, training = train_sft(
        base, initial, data, cfg.training, backend=backend, max_seq_length=cfg.data.max_seq_length
    )
    champion_adapter = artifact(champion["adapter_artifact_id"] if champion else None)
    report = evaluate(
        base, adapter, data, cfg.evaluation, backend=backend, champion=champion, champion_adapter=champion_adapter
    )
    champion_id = champion["adapter_artifact_id"] if champion else None
    verdict = promotion_gate(report, adapter, cfg.promotion, champion_version, champion_adapter_id=champion_id)
    merge_and_push(base, adapter, data, report, training, cfg, verdict=verdict)


def prepared_data(cfg: RunConfig) -> Any:
    """The prepare step, keyed on the data's bytes (of every source) and the tokenizer's template renderings and
    revision too, so edited data or an edited chat template at the same path is not a cache hit."""
    return prepare_dataset(
        cfg.data,
        tokenizer_source=cfg.model.name,
        trust_remote_code=cfg.model.trust_remote_code,
        source_fingerprint=sources_fingerprint(cfg.data),
        tokenizer_revision=cfg.model.revision,
        tokenizer_key=tokenizer_cache_key(cfg.model.name, cfg.model.revision, cfg.model.trust_remote_code),
    )


def artifact(artifact_id: str | None) -> Any:
    """An artifact version from the store by id (a step input from an earlier run), or None."""
    return Client().get_artifact_version(artifact_id) if artifact_id else None
