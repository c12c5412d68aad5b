"""The `prepare` pipeline: only the dataset step, to check data, template and masking before paying for training.

python run.py --pipeline prepare --set data.source=my.jsonl --set data.chat_template=chatml
"""

from zenml import pipeline

from llmtune.config import RunConfig
from pipelines.finetune import prepared_data


@pipeline(name="prepare")
def prepare(config: dict) -> None:
    prepared_data(RunConfig.model_validate(config))
