"""Step 4: supervised fine-tuning of the adapter with TRL's SFTTrainer; the loss curve goes to MLflow.

The backend that trained (hf or unsloth) and the peak GPU memory are recorded on the step and in MLflow.
A GPU out-of-memory error ends the step with the settings to lower (see `llmtune.gpu.explain_oom`).
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from datasets import load_from_disk
from transformers import AutoTokenizer
from zenml import step
from zenml.client import Client

from llmtune import gpu, training
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
    chosen = resolve_backend(backend)
    tokenizer = AutoTokenizer.from_pretrained(Path(data.path) / "tokenizer")
    lora_r = json.loads((Path(initial_adapter.path) / "adapter_config.json").read_text())["r"]
    memory = gpu.TrainingMemorySettings(
        cfg.per_device_train_batch_size, max_seq_length, lora_r, cfg.gradient_checkpointing
    )
    gpu.reset_peak_memory()
    with gpu.explain_oom(memory):
        model = chosen.load_trainable(
            base.path, initial_adapter.path, cfg.gradient_checkpointing, max_seq_length=max_seq_length
        )
        checkpoints = checkpoint_dir(cfg, base.path, initial_adapter.path, data.path, backend, max_seq_length)
        report = training.train(
            model,
            tokenizer,
            load_from_disk(str(Path(data.path) / "train")),
            cfg,
            tempfile.mkdtemp(prefix="llmtune-train-"),
            max_seq_length,
            checkpoint_dir=checkpoints,
        )
    report.update(backend=chosen.NAME, peak_gpu_memory_gib=round(gpu.peak_memory_gib(), 3))
    out = Path(tempfile.mkdtemp(prefix="llmtune-adapter-"))
    model.save_pretrained(str(out))
    (out / "training_report.json").write_text(json.dumps(report, indent=2))
    record(
        metadata={k: v for k, v in report.items() if k != "loss_history"},
        params={**section_params("training", cfg), "training.backend_used": chosen.NAME},
        metrics={
            "train_seconds": report["train_seconds"],
            "final_train_loss": report["final_loss"],
            "peak_gpu_memory_gib": report["peak_gpu_memory_gib"],
        },
    )
    if mlflow.active_run() is not None:
        mlflow.log_artifacts(str(out), artifact_path="adapter")
    if checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the adapter is stored now; checkpoints are only for resuming
    return Adapter(str(out))


def checkpoint_dir(cfg: TrainingConfig, *inputs: object) -> str | None:
    """Where this training's checkpoints go: the same folder for the same inputs and config, so a retry or
    re-run of a killed step (its upstream steps cached) finds them and resumes."""
    if not cfg.save_steps:
        return None
    root = cfg.checkpoint_dir or os.path.join(Client().active_stack.artifact_store.path, "llmtune-checkpoints")
    if "://" in root:  # a remote artifact store: the Trainer writes to local disk, so resume works on this host
        root = os.path.join(Path.home(), ".cache", "llmtune", "checkpoints")
    key = json.dumps([*map(str, inputs), cfg.model_dump()], sort_keys=True)
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:16])
