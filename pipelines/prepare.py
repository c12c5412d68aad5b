"""The `prepare` pipeline: only the dataset step, to check data, template and masking before paying for training.

python run.py --pipeline prepare --set data.source=my.jsonl --set data.chat_template=chatml
"""

from zenml import pipeline

from llmtune.config import RunConfig
from pipelines.finetune import prepared_data
from steps.tracking import leave_user_error


@pipeline(name="prepare", on_failure=leave_user_error)
def prepare(config: dict) -> None:
    prepared_data(RunConfig.model_validate(config))
