"""Step 4: supervised fine-tuning of the adapter with TRL's SFTTrainer; the loss curve goes to MLflow.

The backend that trained (hf or unsloth) and the peak GPU memory are recorded on the step and in MLflow.
A GPU out-of-memory error ends the step with the settings to lower (see `llmtune.gpu.explain_oom`).
With `training.num_gpus` > 1 training runs data-parallel, one process per GPU (see `llmtune.distributed`).
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from zenml import step
from zenml.client import Client

from llmtune import distributed
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
    processes = distributed.processes_for(cfg.num_gpus, distributed.visible_gpus())
    out = Path(tempfile.mkdtemp(prefix="llmtune-adapter-"))
    job = distributed.TrainJob(
        backend=chosen.NAME,
        base_dir=base.path,
        adapter_dir=initial_adapter.path,
        train_dir=str(Path(data.path) / "train"),
        tokenizer_dir=str(Path(data.path) / "tokenizer"),
        training=cfg.model_dump(),
        max_seq_length=max_seq_length,
        out_dir=str(out),
        checkpoint_dir=checkpoint_dir(cfg, base.path, initial_adapter.path, data.path, backend, max_seq_length),
    )
    # In this process, or with training.num_gpus > 1 one process per GPU; the adapter and report land in `out`.
    report = distributed.train_adapter(job, processes)
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
    if job.checkpoint_dir:  # the adapter is stored now; checkpoints are only for resuming
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return Adapter(str(out))


def checkpoint_dir(cfg: TrainingConfig, *inputs: object) -> str | None:
    """Where this training's checkpoints go: the same folder for the same inputs and config, so a retry or
    re-run of a killed step (its upstream steps cached) finds them and resumes."""
    if not cfg.save_steps:
        return None
    root = cfg.checkpoint_dir or os.path.join(Client().active_stack.artifact_store.path, "llmtune-checkpoints")
    if "://" in root:  # a remote artifact store: the Trainer writes to local disk, so resume works on this host
        root = os.path.join(Path.home(), ".cache", "llmtune", "checkpoints")
        print(
            f"Checkpoints go to {root} on this machine: a retry in another container will not find them. "
            "Set training.checkpoint_dir to a path every retry can reach (a mounted bucket or volume).",
            flush=True,
        )
    key = json.dumps([*map(str, inputs), cfg.model_dump()], sort_keys=True)
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:16])
