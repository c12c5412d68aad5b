"""Model shapes and FLOPs for the benchmarks and the GPU tests: published architecture shapes built with random
weights (offline), the FLOPs of a LoRA training pass, and a measured matmul ceiling to compute MFU against.

Example:
    >>> lora_training_flops(linear_params=1_000, layers=2, hidden=8, lengths=[4], trainable_params=10)
    17776
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from llmtune.train.memory import release_cached_memory


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
