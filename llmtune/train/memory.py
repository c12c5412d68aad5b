"""GPU memory in training: an out-of-memory error a user can act on, and peak memory.

A CUDA out-of-memory error inside training becomes `GpuOutOfMemory`, whose message names the three
settings that decide activation memory (batch size, sequence length, LoRA rank) with their current
values and smaller ones to try, instead of a CUDA traceback.

Example:
    >>> settings = TrainingMemorySettings(batch_size=8, max_seq_length=2048, lora_r=16, gradient_checkpointing=False)
    >>> try:
    ...     with explain_oom(settings):
    ...         raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    ... except GpuOutOfMemory as err:
    ...     print(str(err).splitlines()[1])
      training.per_device_train_batch_size=8 -> 4 (raise training.gradient_accumulation_steps to keep the batch)
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from llmtune.errors import LlmtuneError

# Messages of allocation failures that PyTorch raises as plain RuntimeError (cuBLAS, bitsandbytes, older torch).
OOM_MARKERS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "out of memory")
GIB = 1024**3


class GpuOutOfMemory(LlmtuneError, RuntimeError):
    """The GPU ran out of memory; the message lists the settings to lower, with their values."""


@dataclass(frozen=True)
class TrainingMemorySettings:
    """The run's settings that decide training memory, as the message names them."""

    batch_size: int
    max_seq_length: int
    lora_r: int
    gradient_checkpointing: bool


def is_oom(err: BaseException) -> bool:
    """Whether `err` is a GPU allocation failure (torch.OutOfMemoryError or a RuntimeError saying so)."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in OOM_MARKERS)


def oom_message(settings: TrainingMemorySettings, detail: str = "") -> str:
    """What to lower, each setting with its current value and a smaller one; the largest lever first."""
    lines = [
        "The GPU ran out of memory during training. Lower one of these and run again:",
        f"  training.per_device_train_batch_size={settings.batch_size} -> {max(1, settings.batch_size // 2)}"
        " (raise training.gradient_accumulation_steps to keep the batch)",
        f"  data.max_seq_length={settings.max_seq_length} -> {max(8, settings.max_seq_length // 2)}"
        " (longer examples are dropped)",
        f"  lora.r={settings.lora_r} -> {max(1, settings.lora_r // 2)}",
    ]
    if not settings.gradient_checkpointing:
        lines.append("  or set training.gradient_checkpointing=true (recomputes activations instead of storing them)")
    if detail:
        lines.append(f"CUDA said: {first_line(detail)}")
    return "\n".join(lines)


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


@contextmanager
def explain_oom(settings: TrainingMemorySettings) -> Iterator[None]:
    """Turn a GPU out-of-memory error in the block into `GpuOutOfMemory` with `oom_message`; others pass."""
    try:
        yield
        return
    except Exception as err:
        if isinstance(err, GpuOutOfMemory) or not is_oom(err):
            raise  # already explained (by a data-parallel worker), or not a memory error
        detail = str(err)
    # Raised outside the except block, so the CUDA error's traceback (which holds the activations) is
    # not kept alive as this error's context and the cache can be freed.
    release_cached_memory()
    raise GpuOutOfMemory(oom_message(settings, detail)) from None


def release_cached_memory() -> None:
    """Give cached CUDA blocks back, so a caller that goes on (tests, notebooks) is not left near the limit."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    """Most GPU memory PyTorch held at once since the last reset (allocated tensors, not the cache)."""
    import torch

    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else 0.0


def describe_hardware() -> str:
    """The accelerator (CUDA device name) or the CPU of this machine, with the torch version."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores), torch {torch.__version__}"
