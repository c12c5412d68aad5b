"""Step 4: supervised fine-tuning of the adapter with TRL's SFTTrainer; the loss curve goes to MLflow."""

import json
import tempfile
from pathlib import Path

import mlflow
from datasets import load_from_disk
from transformers import AutoTokenizer
from zenml import step

from llmtune import training
from llmtune.artifacts import Adapter, PreparedData, QuantizedBase
from llmtune.backends import resolve_backend
from llmtune.config import TrainingConfig
from steps._record import record, section_params


@step(experiment_tracker=True)
def train_sft(
    base: QuantizedBase,
    initial_adapter: Adapter,
    data: PreparedData,
    cfg: TrainingConfig,
    backend: str,
    max_seq_length: int,
) -> Adapter:
    model = resolve_backend(backend).load_trainable(base.path, initial_adapter.path, cfg.gradient_checkpointing)
    tokenizer = AutoTokenizer.from_pretrained(Path(data.path) / "tokenizer")
    report = training.train(
        model,
        tokenizer,
        load_from_disk(str(Path(data.path) / "train")),
        cfg,
        tempfile.mkdtemp(prefix="llmtune-train-"),
        max_seq_length,
    )
    out = Path(tempfile.mkdtemp(prefix="llmtune-adapter-"))
    model.save_pretrained(str(out))
    (out / "training_report.json").write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k != "loss_history"}
    record(
        metadata=summary,
        params=section_params("training", cfg),
        metrics={"train_seconds": report["train_seconds"], "final_train_loss": report["final_loss"]},
    )
    if mlflow.active_run() is not None:
        mlflow.log_artifacts(str(out), artifact_path="adapter")
    return Adapter(str(out))
