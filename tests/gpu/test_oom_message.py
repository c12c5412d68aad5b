"""A GPU out-of-memory error becomes a message that names the settings to lower (this part runs on the CPU)."""

from __future__ import annotations

import pytest
import torch

from llmtune.train.memory import GpuOutOfMemory, TrainingMemorySettings, explain_oom, oom_message

SETTINGS = TrainingMemorySettings(batch_size=8, max_seq_length=2048, lora_r=16, gradient_checkpointing=False)


def test_cuda_oom_error_becomes_a_message_naming_the_three_settings() -> None:
    with pytest.raises(GpuOutOfMemory) as caught, explain_oom(SETTINGS):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB. GPU 0 has a total capacity")
    message = str(caught.value)
    assert "training.per_device_train_batch_size=8 -> 4" in message
    assert "data.max_seq_length=2048 -> 1024" in message
    assert "lora.r=16 -> 8" in message
    assert "training.gradient_checkpointing=true" in message
    assert "Tried to allocate 3.91 GiB" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__, "no CUDA traceback chained"


def test_allocation_failures_raised_as_runtime_error_are_recognised() -> None:
    with pytest.raises(GpuOutOfMemory), explain_oom(SETTINGS):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


def test_other_errors_pass_through_unchanged() -> None:
    with pytest.raises(ValueError, match="labels"), explain_oom(SETTINGS):
        raise ValueError("labels are all masked")


def test_checkpointing_advice_only_when_it_is_off() -> None:
    on = TrainingMemorySettings(batch_size=1, max_seq_length=16, lora_r=1, gradient_checkpointing=True)
    message = oom_message(on)
    assert "gradient_checkpointing" not in message
    assert "per_device_train_batch_size=1 -> 1" in message and "lora.r=1 -> 1" in message
