"""Finding earlier work in the ZenML store: the finetune run a `source` names, and the production champion.

`--pipeline export` and `--pipeline evaluate` reuse a finetune run's artifacts (4-bit base, trained
adapter, prepared data) instead of recomputing them; the promotion gate scores the model's current
production version on the same held-out rows as the new run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zenml.client import Client
from zenml.enums import ModelStages

from llmtune.config import ConfigError, RunConfig, SourceConfig

FINETUNE = "finetune"


def find_finetune_run(source: SourceConfig, model_name: str | None) -> Any:
    """The finetune run behind `source.model_version`, else `source.run`, else the latest completed one."""
    client = Client()
    if source.model_version is not None:
        if not model_name:
            raise ConfigError("source.model_version needs export.zenml_model (the model's name).")
        try:
            version = client.get_model_version(model_name, source.model_version)
        except KeyError:
            raise ConfigError(f"Model '{model_name}' has no version '{source.model_version}'.") from None
        run = latest_finetune_run(version)
        if run is None:
            raise ConfigError(f"Model {model_name} version {source.model_version} has no completed {FINETUNE} run.")
        return run
    if source.run:
        try:
            run = client.get_pipeline_run(source.run)
        except KeyError:
            raise ConfigError(f"source.run '{source.run}' is not a pipeline run in this ZenML store.") from None
        if not is_completed_finetune(run):
            raise ConfigError(f"source.run '{source.run}' is not a completed {FINETUNE} run.")
        return run
    latest = client.list_pipeline_runs(pipeline_name=FINETUNE, status="completed", sort_by="desc:created", size=1)
    if not latest.items:
        raise ConfigError(
            f"No completed {FINETUNE} run to start from. Run `python run.py --pipeline finetune` first, "
            "or set source.run, source.model_version or source.adapter."
        )
    return latest.items[0]


def latest_finetune_run(version: Any) -> Any:
    """The newest completed finetune run of a ZenML model version, or None."""
    found = Client().list_pipeline_runs(
        model_version_id=version.id, pipeline_name=FINETUNE, status="completed", sort_by="desc:created", size=1
    )
    return found.items[0] if found.items else None


def is_completed_finetune(run: Any) -> bool:
    return run.pipeline is not None and run.pipeline.name == FINETUNE and run.status.value == "completed"


def run_config(run: Any) -> RunConfig:
    """The resolved config a finetune run was started with."""
    return RunConfig.from_stored((run.config.parameters or {})["config"])


# The artifact each single-artifact step produces, by step (the names the dashboard shows).
STEP_ARTIFACTS = {
    "prepare_dataset": "prepared_data",
    "load_base_model": "quantized_base",
    "inject_lora": "initial_adapter",
    "train_sft": "trained_adapter",
}
LEGACY_OUTPUT = "output"  # what ZenML named them in runs made before they had names


def step_output(run: Any, step: str, name: str | None = None) -> Any:
    """An output artifact version of a step of `run` (by default its `STEP_ARTIFACTS` one, or 'output' in older
    runs); passed to a step, ZenML loads it as that step's input."""
    outputs = run.steps[step].outputs
    wanted = name or STEP_ARTIFACTS[step]
    found = outputs[wanted] if wanted in outputs or name else outputs[LEGACY_OUTPUT]
    return found[0] if isinstance(found, list) else found


def run_artifact_ids(run: Any) -> dict[str, str]:
    """The artifact ids of a finetune run's outputs that other pipelines start from, by role.

    `training_report` is missing for runs made before the training report was an output of its own.
    """
    wanted = {
        "base": ("load_base_model", None),
        "adapter": ("train_sft", None),
        "data": ("prepare_dataset", None),
        "eval_report": ("evaluate", "eval_report"),
        "training_report": ("train_sft", "training_report"),
    }
    ids = {}
    for role, (step, name) in wanted.items():
        outputs = run.steps[step].outputs if step in run.steps else {}
        if (name or STEP_ARTIFACTS[step]) in outputs or (name is None and LEGACY_OUTPUT in outputs):
            ids[role] = str(step_output(run, step, name).id)
    return ids


@dataclass
class Champion:
    """The model's production version, as the evaluate step needs it.

    `adapter` (an artifact version) is set when the champion was trained on the same base as this run,
    so it can be re-scored on this run's held-out rows; otherwise only its `recorded` scores are known.
    """

    version: str
    adapter: Any = None
    recorded: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The evaluate step's parameter: what production *is* (its adapter, or its recorded scores), not its
        version number, so a scheduled run whose own earlier result was promoted stays a cache hit."""
        if self.adapter is not None:
            return {"adapter_artifact_id": str(self.adapter.id), "recorded": {}}
        return {"adapter_artifact_id": None, "recorded": self.recorded}


def find_champion(cfg: RunConfig) -> Champion | None:
    """The production version of `export.zenml_model`, or None when there is none (or no model is configured)."""
    if not cfg.export.zenml_model:
        return None
    try:
        version = Client().get_model_version(cfg.export.zenml_model, ModelStages.PRODUCTION)
    except KeyError:
        return None
    run = latest_finetune_run(version)
    if run is None:
        return None
    recorded = {
        k.removeprefix("tuned_"): float(v)
        for k, v in version.run_metadata.items()
        if k.startswith("tuned_") and isinstance(v, int | float) and not isinstance(v, bool)
    }
    champion = Champion(version=str(version.number), recorded=recorded)
    if same_base(run_config(run), cfg):
        champion.adapter = step_output(run, "train_sft")
    return champion


def same_base(earlier: RunConfig, now: RunConfig) -> bool:
    """Whether an adapter trained by `earlier` fits the 4-bit base that `now` loads."""
    keys = ("name", "revision", "quant_type", "double_quant")
    return all(getattr(earlier.model, k) == getattr(now.model, k) for k in keys)
