"""Step 1: read, template, tokenize, mask and split the instruction data."""

import tempfile

from transformers import AutoTokenizer
from zenml import step

from llmtune import data
from llmtune.artifacts import PreparedData
from llmtune.config import DataConfig
from steps._record import record, section_params


@step(experiment_tracker=True)
def prepare_dataset(cfg: DataConfig, tokenizer_source: str, trust_remote_code: bool = False) -> PreparedData:
    out = tempfile.mkdtemp(prefix="llmtune-data-")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    stats = data.prepare(cfg, tokenizer, out)
    record(
        metadata=stats,
        params={**section_params("data", cfg), "data.fingerprint": stats["fingerprint"]},
        metrics={"data_train_rows": stats["train_rows"], "data_eval_rows": stats["eval_rows"]},
    )
    return PreparedData(out)
