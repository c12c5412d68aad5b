"""GPU helpers: an out-of-memory error a user can act on, peak memory, a measured matmul ceiling, and model FLOPs.

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
    >>> lora_training_flops(linear_params=1_000, layers=2, hidden=8, lengths=[4], trainable_params=10)
    17776
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Messages of allocation failures that PyTorch raises as plain RuntimeError (cuBLAS, bitsandbytes, older torch).
OOM_MARKERS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "out of memory")
GIB = 1024**3


class GpuOutOfMemory(RuntimeError):
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


def measure_matmul_tflops(size: int = 8192, repeats: int = 10, warmup: int = 3) -> float:
    """Dense matmul throughput in TFLOP/s (bf16 on a GPU, float32 on the CPU): the ceiling MFU is measured against.

    >>> measure_matmul_tflops(size=64, repeats=2, warmup=1) > 0
    True
    """
    import torch

    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return 2 * size**3 * repeats / seconds / 1e12


def lora_training_flops(
    linear_params: int, layers: int, hidden: int, lengths: Sequence[int], trainable_params: int
) -> int:
    """Model FLOPs of one LoRA training pass over sequences of `lengths` (padding and recomputation excluded).

    Frozen weights cost a forward and an input-gradient matmul (2 + 2 FLOPs per weight and token); the
    trainable adapter also its weight gradient (6). Causal attention costs 2*hidden*s FLOPs per token
    and layer forward (QK^T and AV over on average s/2 keys, 2 FLOPs each) and twice that backward.
    `linear_params` counts every matmul weight, LM head included, adapters excluded.
    """
    tokens = sum(lengths)
    weights = (4 * linear_params + 6 * trainable_params) * tokens
    attention = 3 * 2 * layers * hidden * sum(s * s for s in lengths)
    return int(weights + attention)


def matmul_params(model: Any) -> tuple[int, int]:
    """(frozen matmul weights incl. the LM head, trainable weights) of a model; 4-bit packing undone."""
    import torch

    frozen = trainable = 0
    for name, param in model.named_parameters():
        count = param.numel() * (2 if param.dtype == torch.uint8 else 1)
        if param.requires_grad:
            trainable += count
        elif param.dim() >= 1 and "embed_tokens" not in name and "norm" not in name:
            frozen += count
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied:  # the LM head shares the embedding matrix, but still does its matmul
        frozen += model.get_input_embeddings().weight.numel()
    return frozen, trainable


# Published architecture shapes (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B), for random-init
# models that benchmark and test the real sizes offline.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
PUBLISHED_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {**_LLAMA3_ROPE},
    },
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {**_LLAMA3_ROPE, "factor": 8.0},
    },
}


def build_random_llama(out_dir: Any, shape: str, tokenizer: Any, seed: int = 0) -> Any:
    """Save a random-init Llama of a published shape (bf16 safetensors) with `tokenizer` to `out_dir`.

    Built on the GPU when there is one (an 8B model initializes in seconds there, minutes on a CPU).
    """
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **PUBLISHED_SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.bfloat16()
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    release_cached_memory()
    return out
