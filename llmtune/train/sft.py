"""Supervised fine-tuning of the LoRA adapter with TRL's SFTTrainer on the prepared (tokenized, masked) data.

Batching: with `training.packing` unset, `resolve_batching` packs mixed-length data (one flattened row of
whole examples per batch row, the fast path for instruction data) and keeps plain rows when every example
has the same length; `llmtune.model.attention` then gives flattened batches one variable-length
attention call per layer.

Example:
    >>> from llmtune.config import TrainingConfig
    >>> cfg = resolve_batching(TrainingConfig(max_steps=5), lengths=[120, 37, 64])
    >>> args = sft_config(cfg, "/tmp/x", max_length=128)
    >>> args.max_steps, args.report_to, args.packing
    (5, [], True)
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from llmtune.config import TrainingConfig
from llmtune.errors import LlmtuneError
from llmtune.model import attention
from llmtune.train import fsdp


class TrainingError(LlmtuneError, RuntimeError):
    """Training could not produce a usable adapter; the message says why and what to change."""


def resolve_batching(cfg: TrainingConfig, lengths: Sequence[int]) -> TrainingConfig:
    """`cfg` with `packing=null` decided from the training examples' token lengths.

    Lengths that differ (instruction data) are packed: every batch row is then a full max_seq_length row of
    whole examples, which keeps the GPU busy where padded or flattened batches of a few short examples leave
    it waiting. Equal lengths (pre-chunked text) gain nothing from packing: plain rows, and padding-free off
    too unless set, so Unsloth runs its compiled blocks. An explicit `packing` is kept as it is.

    >>> resolve_batching(TrainingConfig(), [40, 300, 120]).packing
    True
    >>> same = resolve_batching(TrainingConfig(), [2048] * 8)
    >>> same.packing, same.padding_free
    (False, False)
    >>> resolve_batching(TrainingConfig(packing=False), [40, 300]).packing
    False
    """
    if cfg.packing is not None:
        return cfg
    if len(set(lengths)) > 1:
        return cfg.model_copy(update={"packing": True})
    padding_free = False if cfg.padding_free is None else cfg.padding_free
    return cfg.model_copy(update={"packing": False, "padding_free": padding_free})


def sft_config(cfg: TrainingConfig, output_dir: str | Path, max_length: int, checkpoints: bool = False) -> SFTConfig:
    """TRL's SFTConfig for a training section. Reporting is ours (see `LossHistory`), not the Trainer's.

    With `checkpoints`, the Trainer saves every `save_steps` into `output_dir` (the last two kept). With
    `eval_steps` it computes the eval loss every `eval_steps`; with early stopping it also saves a checkpoint
    at every evaluation (into `output_dir` even without `checkpoints`), keeps the best one from rotation and
    loads it back at the end.

    >>> args = sft_config(TrainingConfig(num_train_epochs=2, eval_steps=5, early_stopping_patience=2), "/tmp/x", 64)
    >>> args.max_steps, args.num_train_epochs, args.eval_steps, args.save_steps, args.load_best_model_at_end
    (-1, 2.0, 5, 5, True)
    """
    import torch

    on_gpu = torch.cuda.is_available()
    # Left out when unset, so the trainer's own default applies (Unsloth's: decide for itself; TRL's: off).
    padding_free: dict[str, Any] = {} if cfg.padding_free is None else {"padding_free": cfg.padding_free}
    return SFTConfig(
        output_dir=str(output_dir),
        # -1: the Trainer counts the steps of num_train_epochs passes (config validation lets only one be set)
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        num_train_epochs=cfg.num_train_epochs if cfg.num_train_epochs is not None else 1.0,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        gradient_checkpointing=fsdp.trainer_checkpointing(cfg),
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
        packing=bool(cfg.packing),
        packing_strategy="bfd",
        **padding_free,
        pad_to_multiple_of=pad_multiple(cfg, max_length) if on_gpu else None,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        report_to="none",
        **_saving_and_evaluation(cfg, checkpoints),
        dataloader_num_workers=0,
        disable_tqdm=False,
        dataset_num_proc=None,
        **fsdp.trainer_arguments(cfg),
    )


def _saving_and_evaluation(cfg: TrainingConfig, checkpoints: bool) -> dict[str, Any]:
    """When the Trainer evaluates and saves. Keeping the best adapter needs a checkpoint at every evaluation
    (the Trainer's load_best_model_at_end), whatever save_steps says; the best one is kept from rotation."""
    evaluation: dict[str, Any] = {"eval_strategy": "no"}
    if cfg.eval_steps:
        # Loss only: without it the Trainer would gather every eval batch's logits (rows x length x vocab).
        evaluation = {"eval_strategy": "steps", "eval_steps": cfg.eval_steps, "prediction_loss_only": True}
    if cfg.keeps_best:
        return {
            **evaluation,
            "save_strategy": "steps",
            "save_steps": cfg.eval_steps,
            "save_total_limit": 2,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
    saving = "steps" if checkpoints and cfg.save_steps else "no"
    return {**evaluation, "save_strategy": saving, "save_steps": cfg.save_steps or 500, "save_total_limit": 2}


def pad_multiple(cfg: TrainingConfig, max_length: int) -> int:
    """What GPU batches are padded to a multiple of (labels of the pad are masked; the benchmark never counts it).

    Packed batches: the whole flattened batch, `per_device_train_batch_size` rows of `max_length` (packing
    fills rows to within a few tokens), so every step has the same shape and the allocator and matmul
    plans are reused. Otherwise 8 tokens: a token count that is not a multiple of 8 sends the LoRA weight
    gradients (whose inner dimension is the token count) to slow unaligned matmul kernels.

    >>> packed = TrainingConfig(packing=True, per_device_train_batch_size=8)
    >>> pad_multiple(packed, 2048), pad_multiple(TrainingConfig(), 2048)
    (16384, 8)
    """
    return cfg.per_device_train_batch_size * max_length if cfg.packing else 8


class _FlashOnlyWarningFilter(logging.Filter):
    """Drops TRL's warnings that packing and padding-free batches need a FlashAttention implementation.

    Every attention path here keeps packed examples apart by their restarting position ids (varlen, one SDPA
    call per example, or transformers' block-diagonal mask; tests/test_attention.py and tests/test_packing.py),
    and the train step logs which one it took, so the warning would only mislead.
    """

    MARKERS = ("Padding-free training is enabled, but the attention", "You are using packing, but the attention")

    def filter(self, record: logging.LogRecord) -> bool:  # TRL's logger prefixes the rank: match inside
        return not any(marker in str(record.msg) for marker in self.MARKERS)


logging.getLogger("trl.trainer.sft_trainer").addFilter(_FlashOnlyWarningFilter())


# Per-step training values the Trainer logs besides the loss, kept in the history and handed to `on_metric`.
STEP_CURVES = ("learning_rate", "grad_norm")


class LossHistory(TrainerCallback):
    """Keeps every logged training loss (with the learning rate and grad norm of that step) and hands each loss to
    `on_log(loss, step)`, each of `STEP_CURVES` to `on_metric(name, value, step)` (the step logs them to MLflow),
    and eval losses to `on_eval(loss, step)`."""

    def __init__(
        self,
        on_log: Callable[[float, int], None] | None = None,
        on_metric: Callable[[str, float, int], None] | None = None,
        on_eval: Callable[[float, int], None] | None = None,
    ) -> None:
        self.points: list[dict[str, float]] = []
        self.forward_to = on_log
        self.forward_metric = on_metric
        self.forward_eval_to = on_eval

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "eval_loss" in logs and self.forward_eval_to is not None:
            self.forward_eval_to(float(logs["eval_loss"]), state.global_step)
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise TrainingError(
                f"Training loss became {loss} at step {state.global_step}. Lower "
                f"training.learning_rate or check that some labels are not masked."
            )
        curves = {name: float(logs[name]) for name in STEP_CURVES if isinstance(logs.get(name), int | float)}
        self.points.append({"step": state.global_step, "loss": loss, **curves})
        if self.forward_to is not None:
            self.forward_to(loss, state.global_step)
        if self.forward_metric is not None:
            for name, value in curves.items():
                self.forward_metric(name, value, state.global_step)


class TrainingProgress(TrainerCallback):
    """Training progress a user can follow: step/total, loss, learning rate, tokens/s and ETA.

    A tqdm bar when the output is a terminal; otherwise (step logs, CI, a pipe) one line per logging step.
    Replaces the Trainer's own bar and its printed log dictionaries. Only the main process reports.

    >>> progress = TrainingProgress(tokens_per_step=2048, use_bar=False)
    >>> progress.total, progress.first_step, progress.started = 200, 0, time.perf_counter() - 20.0
    >>> progress.last = {"loss": 1.2345, "learning_rate": 0.0019, "grad_norm": 0.52}
    >>> print(progress.line(step=20))  # doctest: +ELLIPSIS
    step 20/200 (10%) | loss 1.234 | lr 1.90e-03 | grad norm 0.52 | 2,0... tokens/s | elapsed 0:20 | ETA 3:0...
    """

    def __init__(self, tokens_per_step: float, use_bar: bool | None = None) -> None:
        self.tokens_per_step = tokens_per_step
        self.use_bar = _on_a_terminal() if use_bar is None else use_bar
        self.total, self.first_step, self.started = 0, 0, time.perf_counter()
        self.last: dict[str, float] = {}
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.total, self.first_step, self.started = int(state.max_steps), int(state.global_step), time.perf_counter()
        if self.use_bar and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.first_step, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix_str(self.line(state.global_step, short=True), refresh=False)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or not state.is_world_process_zero:
            return
        self.last.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        if self.bar is None and ("loss" in logs or "eval_loss" in logs):
            print(self.line(state.global_step), flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, step: int, short: bool = False) -> str:
        """The progress at `step` as one line (`short`: without step and ETA, which the bar shows itself)."""
        elapsed = time.perf_counter() - self.started
        done = max(step - self.first_step, 0)
        parts = [f"{name} {fmt(self.last[key])}" for key, name, fmt in _SHOWN if key in self.last]
        if done:
            parts.append(f"{self.tokens_per_step * done / elapsed:,.0f} tokens/s")
        if short:
            return " | ".join(parts)
        eta = f" | ETA {_clock((self.total - step) * elapsed / done)}" if done else ""
        head = f"step {step}/{self.total} ({100 * step // max(self.total, 1)}%)"
        return " | ".join([head, *parts]) + f" | elapsed {_clock(elapsed)}{eta}"


# What a progress line shows of the Trainer's logs: key, label, format.
_SHOWN: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("loss", "loss", lambda v: f"{v:.4g}"),
    ("learning_rate", "lr", lambda v: f"{v:.2e}"),
    ("grad_norm", "grad norm", lambda v: f"{v:.3g}"),
    ("eval_loss", "eval loss", lambda v: f"{v:.4g}"),
)


def _clock(seconds: float) -> str:
    """0:20, 3:05, 1:02:03."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _on_a_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


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
    on_loss: Callable[[float, int], None] | None = None,
    on_metric: Callable[[str, float, int], None] | None = None,
    eval_dataset: Any = None,
    on_eval: Callable[[float, int], None] | None = None,
) -> dict[str, Any]:
    """Train the adapter in place on `model` (a trainable PeftModel); return the loss history and speed.

    `callbacks` ride along with the loss history (benchmarks use one to time steps); `on_loss(loss, step)`
    gets every logged loss as it comes (the train step logs it to MLflow). With a
    `checkpoint_dir`, checkpoints are saved there every `cfg.save_steps`, and training resumes from
    the last one found there (model, optimizer, scheduler, RNG and data position), so a killed run
    loses at most one checkpoint interval. With `cfg.eval_steps`, the loss on `eval_dataset` is computed
    every eval_steps and handed to `on_eval(loss, step)`; with `cfg.early_stopping_patience` training stops
    when it has not improved for that many evaluations, and `model` ends with the best evaluated adapter.
    """
    if cfg.eval_steps and eval_dataset is None:
        raise TrainingError("training.eval_steps is set but there is no eval split to compute the eval loss on.")
    cfg = resolve_batching(cfg, [len(ids) for ids in train_dataset["input_ids"]])
    history = LossHistory(on_loss, on_metric, on_eval)
    resume_from = last_checkpoint(checkpoint_dir) if checkpoint_dir else None
    stopping = [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []
    trainer = _PortableSFTTrainer(
        model=model,
        args=sft_config(cfg, checkpoint_dir or work_dir, max_length, checkpoints=checkpoint_dir is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if cfg.eval_steps else None,
        processing_class=tokenizer,
        callbacks=[history, *stopping, *(callbacks or [])],
    )
    for default in (ProgressCallback, PrinterCallback):  # our progress replaces the bar and the printed dicts
        trainer.remove_callback(default)
    trainer.add_callback(TrainingProgress(_tokens_per_step(trainer)))
    keep_saved_modules_float32(model)
    # One process trains on one GPU. With several visible and no data-parallel launch, the Trainer would
    # multiply the batch by their number for nn.DataParallel, which it then skips for a 4-bit model.
    trainer.args._n_gpu = min(trainer.args.n_gpu, 1)
    # As the trainer resolved it: TRL flattens packed batches too, whatever args.padding_free says.
    flattened = bool(getattr(trainer, "padding_free", getattr(trainer.args, "padding_free", False)))
    path = attention.use_for_training(model, flattened, enabled=cfg.varlen_attention)
    print(f"Attention: {path.describe()}", flush=True)
    trained_on: Any = trainer.train_dataset  # after TRL's preparation: packed rows when packing is on
    print(batching_summary(cfg, flattened, len(train_dataset), len(trained_on), trainer.args.world_size), flush=True)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    if not history.points:
        history.points.append({"step": trainer.state.global_step, "loss": float(result.training_loss)})
    tokens = sum(len(ids) for ids in trained_on["input_ids"]) * _epochs_seen(trainer, trained_on)
    return {
        **length_report(cfg, trainer.state),
        "loss_history": history.points,
        "final_loss": history.points[-1]["loss"],
        "first_loss": history.points[0]["loss"],
        "train_seconds": round(seconds, 2),
        "steps": int(trainer.state.global_step),
        "approx_tokens_per_second": round(tokens / seconds, 1),
        "resumed_from_step": _step_of(resume_from),
        "packing": cfg.packing,
        "padding_free": flattened,
        "attention": path.name,
        "attention_reason": path.reason,
        "train_rows": len(train_dataset),
        "rows_after_packing": len(trained_on),
        "epochs": round(_epochs_seen(trainer, trained_on), 3),
        "data_parallel_processes": int(trainer.args.world_size),
    }


def _tokens_per_step(trainer: Any) -> float:
    """Tokens one optimizer step trains on, on average over the (prepared, maybe packed) training rows."""
    rows = trainer.train_dataset
    mean_row = sum(len(ids) for ids in rows["input_ids"]) / max(len(rows), 1)
    args = trainer.args
    return mean_row * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def keep_saved_modules_float32(model: Any) -> int:
    """Put the modules trained in full (lora.modules_to_save) back in float32; return how many tensors.

    TRL casts every trainable tensor of a quantized model to bfloat16 (the QLoRA recipe for the LoRA factors),
    but a whole embedding or LM head kept in bfloat16 loses the small updates it gets, and on the CPU, which
    trains without autocast, its matmul with float32 activations fails.
    """
    import torch

    cast = 0
    for name, param in model.named_parameters():
        if param.requires_grad and ".modules_to_save." in name and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def length_report(cfg: TrainingConfig, state: Any) -> dict[str, Any]:
    """How long training ran and why it ended, and which adapter it ended on, from the Trainer's state.

    The eval history comes from the state's log, which a resumed run restores from its checkpoint, so it
    holds the evaluations from before a kill too.
    """
    evals = [
        {"step": int(entry["step"]), "eval_loss": float(entry["eval_loss"])}
        for entry in state.log_history
        if "eval_loss" in entry
    ]
    planned = int(state.max_steps)
    report: dict[str, Any] = {
        "length_by": "max_steps" if cfg.max_steps is not None else "num_train_epochs",
        "planned_steps": planned,
        "eval_history": evals,
        "stopped_early": bool(cfg.keeps_best and state.global_step < planned),
        "adapter_kept": "last",
        "adapter_step": int(state.global_step),
    }
    if evals:
        best = min(evals, key=lambda e: e["eval_loss"])
        report.update(
            best_eval_loss=best["eval_loss"], best_eval_step=best["step"], final_eval_loss=evals[-1]["eval_loss"]
        )
    if cfg.keeps_best and state.best_global_step:
        report.update(adapter_kept="best", adapter_step=int(state.best_global_step))
    return report


def planned_steps(cfg: TrainingConfig, rows: int, processes: int = 1) -> int:
    """Optimizer steps the training section makes of `rows` batch rows, as the Trainer counts them.

    >>> planned_steps(TrainingConfig(max_steps=7), rows=100)
    7
    >>> planned_steps(TrainingConfig(num_train_epochs=1.5, per_device_train_batch_size=8), rows=100)
    20
    """
    if cfg.max_steps is not None:
        return cfg.max_steps
    assert cfg.num_train_epochs is not None
    batches = math.ceil(rows / (cfg.per_device_train_batch_size * processes))
    per_epoch = max(1, math.ceil(batches / cfg.gradient_accumulation_steps))
    return math.ceil(cfg.num_train_epochs * per_epoch)


def batching_summary(cfg: TrainingConfig, flattened: bool, examples: int, rows: int, processes: int = 1) -> str:
    """One line on what a step trains and how many epochs max_steps makes (or steps num_train_epochs makes).

    >>> cfg = TrainingConfig(max_steps=100, packing=True, per_device_train_batch_size=8)
    >>> print(batching_summary(cfg, True, examples=20000, rows=2000))
    Batching: packed, 20000 examples in 2000 rows (10.0 a row); a step trains 8 rows (~80 examples), so 100 steps
    = 0.4 epochs.
    >>> cfg = TrainingConfig(num_train_epochs=2, packing=True, per_device_train_batch_size=8)
    >>> print(batching_summary(cfg, True, examples=20000, rows=2000))
    Batching: packed, 20000 examples in 2000 rows (10.0 a row); a step trains 8 rows (~80 examples), so 2 epochs
    = 500 steps.
    """
    rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * processes
    steps = planned_steps(cfg, rows, processes)
    mode = "packed" if cfg.packing else "padding-free (each batch one flattened row)" if flattened else "padded"
    per_row = examples / max(1, rows)
    length = (
        f"{steps} steps = {steps * rows_per_step / max(1, rows):.1f} epochs"
        if cfg.max_steps is not None
        else f"{cfg.num_train_epochs:g} epochs = {steps} steps"
    )
    return (
        f"Batching: {mode}, {examples} examples in {rows} rows ({per_row:.1f} a row); a step trains {rows_per_step} "
        f"rows (~{rows_per_step * per_row:.0f} examples), so {length}."
    )


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
