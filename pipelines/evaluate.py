"""The `evaluate` pipeline: score an existing adapter against its base (and production) without training.

    python run.py --pipeline evaluate                                        # the latest finetune run
    python run.py --pipeline evaluate --set source.model_version=production --set evaluation.num_generation_prompts=200
    python run.py --pipeline evaluate --set source.run=finetune-2026_...
    python run.py --pipeline evaluate --set source.adapter=outputs/<run>/adapter --config my-data.yaml

With `source.run` or `source.model_version` it reuses that run's 4-bit base, trained adapter and
prepared data (the same held-out rows and template), and takes this invocation's `evaluation` and
`promotion` sections. With `source.adapter` (any PEFT adapter folder in safetensors format) the
base, data and template come from this invocation's config, so `model.name` must be the adapter's
base. The model's production version is scored too when there is one, and the summary says what
the promotion gate would decide; nothing is promoted, merged or published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zenml import pipeline
from zenml.client import Client

from llmtune.artifacts import check_adapter_dir
from llmtune.backends.hf import PickleWeightsRefused
from llmtune.config import ConfigError, RunConfig
from llmtune.data import source_fingerprint
from pipelines.finetune import champion_adapter_artifact, prepared_data
from pipelines.sources import find_champion, find_finetune_run, run_config, step_output
from steps import evaluate, import_adapter, load_base_model


@pipeline(name="evaluate")
def evaluate_adapter(config: dict, source_run_id: str | None = None, champion: dict | None = None) -> None:
    cfg = RunConfig.model_validate(config)
    champion_adapter = champion_adapter_artifact(champion)
    if source_run_id:
        run = Client().get_pipeline_run(source_run_id)
        base, adapter = step_output(run, "load_base_model"), step_output(run, "train_sft")
        data = step_output(run, "prepare_dataset")
    else:
        assert cfg.source.adapter is not None
        data = prepared_data(cfg)
        base = load_base_model(cfg.model)
        adapter = import_adapter(cfg.source.adapter, source_fingerprint(cfg.source.adapter))
    evaluate(
        base,
        adapter,
        data,
        cfg.evaluation,
        backend=cfg.model.backend,
        champion=champion,
        champion_adapter=champion_adapter,
    )


def resolve(cfg: RunConfig) -> tuple[RunConfig, Any]:
    """The config to evaluate with and the finetune run it starts from (None for `source.adapter`)."""
    if cfg.source.adapter:
        try:
            adapter_config = check_adapter_dir(cfg.source.adapter)
        except PickleWeightsRefused as err:
            raise ConfigError(f"source.adapter: {err}") from None
        trained_on = adapter_config.get("base_model_name_or_path")
        if trained_on and trained_on != cfg.model.name:
            print(f"Note: the adapter names '{trained_on}' as its base; evaluating it on model.name={cfg.model.name}.")
        return cfg, None
    run = find_finetune_run(cfg.source, cfg.export.zenml_model)
    earlier = run_config(run)
    updates = {"evaluation": cfg.evaluation, "promotion": cfg.promotion, "export": cfg.export, "source": cfg.source}
    return earlier.model_copy(update=updates), run


def launch(cfg: RunConfig, enable_cache: bool) -> int:
    """Evaluate the chosen adapter and print the summary and the gate's would-be verdict; the CLI's entry point."""
    from pipelines.stack import run_options
    from pipelines.summary import print_gate_preview, print_summary

    cfg, source = resolve(cfg)
    what = f"finetune run {source.name}" if source is not None else f"adapter {Path(str(cfg.source.adapter))}"
    print(f"Evaluating {what} (no training).", flush=True)
    champion = find_champion(cfg)
    if champion is not None and source is not None and _is_champion_run(champion, source):
        print(f"It is the production version ({champion.version}) itself: nothing to compare it with.")
        champion = None
    run = evaluate_adapter.with_options(enable_cache=enable_cache, **run_options())(
        config=cfg.model_dump(),
        source_run_id=str(source.id) if source is not None else None,
        champion=champion.describe() if champion else None,
    )
    print_summary(run.id, champion_version=champion.version if champion else None)
    print_gate_preview(run.id, cfg.promotion, champion.version if champion else None)
    return 0


def _is_champion_run(champion: Any, source: Any) -> bool:
    return source.model_version is not None and str(source.model_version.number) == champion.version
