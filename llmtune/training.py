"""Supervised fine-tuning of the LoRA adapter with TRL's SFTTrainer on the prepared (tokenized, masked) data.

Example:
    >>> from llmtune.config import TrainingConfig
    >>> args = sft_config(TrainingConfig(max_steps=5), "/tmp/x", max_length=128)
    >>> args.max_steps, args.report_to
    (5, [])
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from llmtune.config import TrainingConfig


class TrainingError(RuntimeError):
    """Training could not produce a usable adapter; the message says why and what to change."""


def sft_config(cfg: TrainingConfig, output_dir: str | Path, max_length: int, checkpoints: bool = False) -> SFTConfig:
    """TRL's SFTConfig for a training section. Reporting is ours (see `LossHistory`), not the Trainer's.

    With `checkpoints`, the Trainer saves every `save_steps` into `output_dir` (the last two kept).
    """
    import torch

    on_gpu = torch.cuda.is_available()
    # Left out when unset, so the trainer's own default applies (Unsloth's: decide for itself; TRL's: off).
    padding_free: dict[str, Any] = {} if cfg.padding_free is None else {"padding_free": cfg.padding_free}
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        gradient_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant checkpointing and no search for unused parameters: what DistributedDataParallel needs
        # over a 4-bit base whose LoRA weights all take part in every step (one process: no effect).
        gradient_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        logging_steps=cfg.logging_steps,
        # The Trainer's NaN filter would log a diverged step as the running mean, hiding it from LossHistory's
        # check, and reads the loss on the host every step, which stalls the GPU between steps.
        logging_nan_inf_filter=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # TRL refuses to truncate flattened batches; the prepare step has already cut or dropped longer examples.
        max_length=None if cfg.padding_free and not cfg.packing else max_length,
        # Packing: best-fit-decreasing into rows of max_length, padding-free, with position_ids restarting
        # at every example so attention stays within each example (TRL's "bfd" strategy).
        packing=cfg.packing,
        packing_strategy="bfd",
        **padding_free,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        report_to="none",
        save_strategy="steps" if checkpoints and cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        eval_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=False,
        dataset_num_proc=None,
    )


class LossHistory(TrainerCallback):
    """Keeps every logged training loss and, when an MLflow run is active, logs it there per step."""

    def __init__(self) -> None:
        self.points: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise TrainingError(
                f"Training loss became {loss} at step {state.global_step}. Lower "
                f"training.learning_rate or check that some labels are not masked."
            )
        self.points.append({"step": state.global_step, "loss": loss})
        _log_mlflow_metric("train_loss", loss, state.global_step)


def _log_mlflow_metric(name: str, value: float, step: int) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metric(name, value, step=step)


class _PortableSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss falls back to the model's own cross-entropy where TRL's Triton LM head cannot run.

    TRL 1.15 computes the SFT loss with a fused Triton kernel; Triton has no CPU backend, so on the CPU
    we let the model compute the same token-mean cross-entropy from full logits.
    """

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if _fused_lm_head_runs(inputs["input_ids"]):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {**inputs, "use_cache": False}
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients, so scale back up,
            # as TRL's and the Trainer's own losses do.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def _fused_lm_head_runs(tensor: Any) -> bool:
    from trl.trainer import utils as trl_utils

    return tensor.is_cuda and getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None


def train(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    cfg: TrainingConfig,
    work_dir: str | Path,
    max_length: int,
    callbacks: list[TrainerCallback] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train the adapter in place on `model` (a trainable PeftModel); return the loss history and speed.

    `callbacks` ride along with the loss history (benchmarks use one to time steps). With a
    `checkpoint_dir`, checkpoints are saved there every `cfg.save_steps`, and training resumes from
    the last one found there (model, optimizer, scheduler, RNG and data position), so a killed run
    loses at most one checkpoint interval.
    """
    history = LossHistory()
    resume_from = last_checkpoint(checkpoint_dir) if checkpoint_dir else None
    trainer = _PortableSFTTrainer(
        model=model,
        args=sft_config(cfg, checkpoint_dir or work_dir, max_length, checkpoints=checkpoint_dir is not None),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[history, *(callbacks or [])],
    )
    # One process trains on one GPU. With several visible and no data-parallel launch, the Trainer would
    # multiply the batch by their number for nn.DataParallel, which it then skips for a 4-bit model.
    trainer.args._n_gpu = min(trainer.args.n_gpu, 1)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    if not history.points:
        history.points.append({"step": cfg.max_steps, "loss": float(result.training_loss)})
    trained_on: Any = trainer.train_dataset  # after TRL's preparation: packed rows when packing is on
    tokens = sum(len(ids) for ids in trained_on["input_ids"]) * _epochs_seen(trainer, trained_on)
    return {
        "loss_history": history.points,
        "final_loss": history.points[-1]["loss"],
        "first_loss": history.points[0]["loss"],
        "train_seconds": round(seconds, 2),
        "steps": int(trainer.state.global_step),
        "approx_tokens_per_second": round(tokens / seconds, 1),
        "resumed_from_step": _step_of(resume_from),
        "packing": cfg.packing,
        # As the trainer resolved it: TRL flattens packed batches too, whatever args.padding_free says.
        "padding_free": bool(getattr(trainer, "padding_free", getattr(trainer.args, "padding_free", False))),
        "train_rows": len(train_dataset),
        "rows_after_packing": len(trained_on),
        "data_parallel_processes": int(trainer.args.world_size),
    }


def last_checkpoint(checkpoint_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-<step>` folder in `checkpoint_dir`, or None.

    The Trainer writes trainer_state.json last, so a folder without it was cut off mid-save (a kill
    during saving) and is passed over.

    >>> import tempfile; root = Path(tempfile.mkdtemp())
    >>> for step, done in ((5, True), (10, True), (15, False)):
    ...     (root / f"checkpoint-{step}").mkdir()
    ...     _ = (root / f"checkpoint-{step}" / "trainer_state.json").write_text("{}") if done else None
    >>> Path(last_checkpoint(root)).name
    'checkpoint-10'
    """
    complete = [p for p in Path(checkpoint_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(complete, key=_step_of)) if complete else None


def _step_of(checkpoint: str | Path | None) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


def _epochs_seen(trainer: Any, dataset: Any) -> float:
    # Every process of a data-parallel run trains on its own rows of each step.
    seen = trainer.state.global_step * trainer.args.per_device_train_batch_size * trainer.args.world_size
    return seen * trainer.args.gradient_accumulation_steps / max(1, len(dataset))
