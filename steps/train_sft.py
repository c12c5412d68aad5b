"""Step 4: supervised fine-tuning of the adapter with TRL's SFTTrainer; the loss curve goes to MLflow as it falls.

The trained adapter and the typed training report (loss curve, speed, batching, attention path, the
backend and machine that trained) are the step's two outputs. A GPU out-of-memory error ends the step
with the settings to lower (see `llmtune.train.memory.explain_oom`). With `training.num_gpus` > 1 training
runs data-parallel, one process per GPU (see `llmtune.train.distributed`). With `training.eval_steps` the
loss on the prepared eval split goes to MLflow as its own curve, `eval_loss`; with early stopping the adapter
kept is the best evaluated one (`adapter_kept` in the step metadata).
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from zenml import step
from zenml.client import Client

from llmtune.artifacts import Adapter, PreparedData, QuantizedBase, TrainingReport
from llmtune.config import TrainingConfig
from llmtune.model import backend_for
from llmtune.train import distributed
from steps import tracking

# The MLflow curve of the eval loss computed during training (training.eval_steps), next to train_loss.
EVAL_LOSS_CURVE = "eval_loss"


@step(experiment_tracker=True)
def train_sft(
    base: QuantizedBase,
    initial_adapter: Adapter,
    data: PreparedData,
    cfg: TrainingConfig,
    backend: str,
    max_seq_length: int,
) -> tuple[Annotated[Adapter, "trained_adapter"], Annotated[TrainingReport, "training_report"]]:
    chosen, note = backend_for(backend, initial_adapter.config(), "train")
    out = tempfile.mkdtemp(prefix="llmtune-adapter-")
    job = distributed.TrainJob(
        backend=chosen.NAME,
        base_dir=base.path,
        adapter_dir=initial_adapter.path,
        train_dir=str(data.train_dir),
        tokenizer_dir=str(data.tokenizer_dir),
        training=cfg,
        max_seq_length=max_seq_length,
        out_dir=out,
        checkpoint_dir=checkpoint_dir(cfg, base.path, initial_adapter.path, data.path, backend, max_seq_length),
        eval_dir=str(data.eval_dir),
        backend_note=note,
    )
    processes = distributed.processes_for(cfg.num_gpus, distributed.visible_gpus())
    report = distributed.train_adapter(
        job,
        processes,
        on_loss=tracking.metric_logger("train_loss"),
        on_metric=tracking.step_metric_logger(),
        on_eval=tracking.metric_logger(EVAL_LOSS_CURVE),
    )
    print(f"Training: {report.length_line()}", flush=True)
    tracking.record(
        metadata=report.summary(),
        params={**tracking.section_params("training", cfg), "training.backend_used": report.backend},
        metrics={
            "train_seconds": report.train_seconds,
            "final_train_loss": report.final_loss,
            "peak_gpu_memory_gib": report.peak_gpu_memory_gib,
            "train_steps": report.steps,
            "train_epochs": report.epochs,
            **({"best_eval_loss": report.best_eval_loss} if report.best_eval_loss is not None else {}),
        },
    )
    tracking.log_files([Path(out)], "adapter")
    if job.checkpoint_dir:  # the adapter is stored now; checkpoints are only for resuming
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return Adapter(out), report


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
