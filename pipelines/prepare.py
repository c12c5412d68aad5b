"""The `prepare` pipeline: only the dataset step, to check data, template and masking before paying for training.

python run.py --pipeline prepare --set data.source=my.jsonl --set data.chat_template=chatml
"""

from zenml import pipeline
from zenml.client import Client

from llmtune.config import RunConfig
from llmtune.data import read_stats, report, source_fingerprint
from steps import prepare_dataset


@pipeline(name="prepare")
def prepare(config: dict) -> None:
    cfg = RunConfig.model_validate(config)
    prepare_dataset(
        cfg.data,
        tokenizer_source=cfg.model.name,
        trust_remote_code=cfg.model.trust_remote_code,
        source_fingerprint=source_fingerprint(cfg.data.source),
    )


def launch(cfg: RunConfig, enable_cache: bool) -> int:
    """Run `prepare` and print what it did: counts, drops by reason, token lengths, a marked example."""
    run = prepare.with_options(enable_cache=enable_cache)(config=cfg.model_dump())
    step = Client().get_pipeline_run(run.id).steps["prepare_dataset"]
    prepared = step.outputs["output"][0].load()
    report.print_report(read_stats(prepared.path))
    print(f"Prepared data: {prepared.path}\nZenML run:     {run.name} (step status: {step.status.value})")
    return 0
