"""Length of training and evaluation during it, on the tiny model with the real TRL Trainer: epochs instead
of steps, the held-out loss every eval_steps, early stopping that keeps the best adapter, and a resume
after SIGKILL with both on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoTokenizer

from llmtune.artifacts import TrainingReport
from llmtune.config import LoraConfig, TrainingConfig
from llmtune.model import hf
from llmtune.train import distributed, sft
from tests.conftest import ROOT


def job_for(
    quantized_dir: Path, prepared_dir: Path, adapter0: Path, out: Path, cfg: TrainingConfig, **extra: object
) -> distributed.TrainJob:
    return distributed.TrainJob(
        backend="hf",
        base_dir=str(quantized_dir),
        adapter_dir=str(adapter0),
        train_dir=str(prepared_dir / "train"),
        tokenizer_dir=str(prepared_dir / "tokenizer"),
        training=cfg,
        max_seq_length=128,
        out_dir=str(out),
        eval_dir=str(prepared_dir / "eval"),
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def adapter0(tmp_path_factory: pytest.TempPathFactory, quantized_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("length") / "adapter0"
    hf.add_lora(quantized_dir, LoraConfig(r=4, alpha=8), out)
    return out


def eval_loss_of(quantized_dir: Path, adapter: Path, prepared_dir: Path, batch_size: int) -> float:
    """The eval split's loss under `adapter`, as the Trainer computes it (mean over batches of their mean)."""
    from transformers import DataCollatorForSeq2Seq

    model = hf.load_for_inference(quantized_dir, adapter)
    tokenizer = AutoTokenizer.from_pretrained(prepared_dir / "tokenizer")
    rows = load_from_disk(str(prepared_dir / "eval")).select_columns(["input_ids", "labels"])
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    losses = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            losses.append(float(model(**batch).loss))
    return sum(losses) / len(losses)


def test_num_train_epochs_decides_the_steps(quantized_dir: Path, prepared_dir: Path, adapter0: Path, tmp_path: Path):
    cfg = TrainingConfig(
        num_train_epochs=0.3, per_device_train_batch_size=16, packing=False, logging_steps=2, learning_rate=3e-3
    )
    assert cfg.max_steps is None
    report = distributed.train_adapter(job_for(quantized_dir, prepared_dir, adapter0, tmp_path / "a", cfg))
    rows = len(load_from_disk(str(prepared_dir / "train")))
    assert report.length_by == "num_train_epochs"
    assert report.steps == report.planned_steps == sft.planned_steps(cfg, rows) > 0
    assert report.epochs == pytest.approx(0.3, abs=16 / rows), "trained 0.3 of a pass over the rows"
    assert report.eval_history == [] and report.best_eval_loss is None, "eval_steps off: no evaluation"
    assert "by training.num_train_epochs" in report.length_line()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, quantized_dir: Path, prepared_dir: Path, adapter0: Path) -> dict:
    """Training with a learning rate far too high for the tiny model and no decay: its eval loss falls, then
    climbs, so early stopping ends it before max_steps (seeded, the same on every run of this torch)."""
    cfg = TrainingConfig(
        max_steps=60,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=8,
        packing=False,
        logging_steps=2,
        eval_steps=3,
        early_stopping_patience=2,
    )
    out = tmp_path_factory.mktemp("stopped") / "adapter"
    seen: list[tuple[float, int]] = []
    report = distributed.train_adapter(
        job_for(quantized_dir, prepared_dir, adapter0, out, cfg), on_eval=lambda loss, step: seen.append((loss, step))
    )
    return {"cfg": cfg, "report": report, "seen": seen, "adapter": out}


def test_eval_loss_is_computed_every_eval_steps_and_handed_on(stopped: dict) -> None:
    report: TrainingReport = stopped["report"]
    steps = [int(point["step"]) for point in report.eval_history]
    assert steps == list(range(3, 3 * len(steps) + 1, 3)), "one evaluation every 3 steps"
    assert stopped["seen"] == [(point["eval_loss"], int(point["step"])) for point in report.eval_history]


def test_early_stopping_stops_and_keeps_the_best_adapter(stopped: dict, quantized_dir: Path, prepared_dir: Path):
    report: TrainingReport = stopped["report"]
    losses = [point["eval_loss"] for point in report.eval_history]
    assert report.stopped_early and report.steps < report.planned_steps == 60
    best = losses.index(min(losses))
    assert len(losses) - 1 - best == 2, "stopped after patience=2 evaluations without improvement"
    assert report.adapter_kept == "best" and report.adapter_step == report.best_eval_step == 3 * (best + 1)
    kept = eval_loss_of(quantized_dir, stopped["adapter"], prepared_dir, stopped["cfg"].per_device_train_batch_size)
    assert kept == pytest.approx(report.best_eval_loss, rel=1e-3), "the saved adapter is the best one"
    assert report.final_eval_loss is not None and kept < report.final_eval_loss
    assert "adapter of the best eval" in report.length_line() and "stopped early" in report.length_line()


WORKER = """
import sys
from llmtune.train import distributed
job = distributed.TrainJob.read(sys.argv[1])
distributed.train_adapter(job)
"""


def test_killed_training_with_evaluation_and_early_stopping_resumes(
    quantized_dir: Path, prepared_dir: Path, adapter0: Path, tmp_path: Path
) -> None:
    """SIGKILL mid-run, then the same job again: it resumes from the last checkpoint with the evaluations
    from before the kill, and still ends on the best adapter of them all."""
    cfg = TrainingConfig(
        max_steps=20,
        learning_rate=3e-3,
        warmup_steps=0,
        per_device_train_batch_size=2,
        packing=False,
        logging_steps=2,
        eval_steps=4,
        early_stopping_patience=3,
    )
    checkpoints = tmp_path / "checkpoints"
    job = job_for(quantized_dir, prepared_dir, adapter0, tmp_path / "adapter", cfg, checkpoint_dir=str(checkpoints))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(job.write(tmp_path / "job.json"))], env=env)
    try:
        deadline = time.monotonic() + 300
        while sft.last_checkpoint(checkpoints) is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "training finished before it could be killed; raise max_steps"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    saved = sft._step_of(sft.last_checkpoint(checkpoints))
    assert saved >= 4

    report = distributed.train_adapter(job)
    assert report.resumed_from_step == saved
    assert [int(p["step"]) for p in report.eval_history][: saved // 4] == list(range(4, saved + 1, 4)), (
        "the evaluations from before the kill are kept"
    )
    assert report.steps == 20 or report.stopped_early
    assert report.adapter_kept == "best" and report.best_eval_loss == min(p["eval_loss"] for p in report.eval_history)
    assert report.adapter_step == report.best_eval_step
