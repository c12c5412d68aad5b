"""GGUF export: the merged 16-bit model as one GGUF file per `export.gguf_types`, for llama.cpp, Ollama, LM Studio.

The file is written with the `gguf` package (the format's own Python library: GGUFWriter, its tensor-name map
and its quantizers), from the merged safetensors, one tensor at a time: the writer takes every tensor's
name, shape and type first, writes the header, then each tensor's bytes as it is converted, so the model is
never in memory at once: for the Llama-3.2-1B shape the converting process peaks at 0.54-0.58x of the 16-bit
checkpoint's size, interpreter and torch included (`benchmarks/gguf_memory.py`).

What is written:
- metadata llama.cpp reads for the family (`FAMILIES`): sizes, heads, RMS-norm epsilon, RoPE base and the
  Llama-3 RoPE frequency factors (the `rope_freqs` tensor);
- the training tokenizer and its chat template (`llmtune.release.gguf_vocab`);
- the weights: 1-D tensors (norms, biases) in float32; the rest in the chosen type. `q4_0` keeps the token
  embedding and output projection in `q8_0` (they take the rounding worst); a tensor whose rows are not a
  multiple of the type's block falls back to f16 and is counted.

llama.cpp's Llama layout rotates interleaved pairs where transformers rotates halves, so the Q and K
projections of the Llama family are permuted (`permute_for_rope`); Qwen, Phi-3 use transformers' halves.

Example:
    >>> import torch
    >>> w = torch.arange(8.0).reshape(4, 2)  # one head of size 4: rows 0, 1 | 2, 3 are the two halves
    >>> permute_for_rope(w, n_head=1)[:, 0].tolist()  # interleaved: 0, 2, 1, 3
    [0.0, 4.0, 2.0, 6.0]
    >>> family_of({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]})
    Traceback (most recent call last):
    ...
    llmtune.release.weights.ExportError: GGUF export does not convert gemma2 (Gemma2ForCausalLM) ...
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune import progress
from llmtune.release.weights import ExportError, base_tensor_files, read_header, read_tensor

# export.gguf_types: the types the gguf package can write (it has no K-quant quantizer, so no q4_k_m).
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
ROWS_PER_CHUNK = 2048  # quantize this many rows at a time: a 1B model's embedding is 1 GB in float32


@dataclass(frozen=True)
class Family:
    """How one transformers architecture becomes a llama.cpp architecture."""

    gguf_arch: str  # llama.cpp's name (general.architecture)
    permute_qk: bool  # llama.cpp's rotation pairs differ from transformers' for this arch


FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),  # llama.cpp runs Mistral as its Llama architecture
    "qwen2": Family("qwen2", permute_qk=False),
    "qwen3": Family("qwen3", permute_qk=False),
    "phi3": Family("phi3", permute_qk=False),
}


def family_of(config: dict[str, Any]) -> Family:
    """The family of a model's config.json, or an ExportError naming the architecture."""
    model_type = config.get("model_type", "?")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    names = ", ".join(config.get("architectures") or []) or "no architectures in config.json"
    raise ExportError(
        f"GGUF export does not convert {model_type} ({names}): it converts Llama, Mistral, Qwen2, Qwen3 and "
        f"Phi-3 models. Drop gguf from export.formats (the merged_16bit folder loads in transformers, vLLM and "
        f"llama.cpp's own converter)."
    )


def gguf_types_module() -> Any:
    """The gguf package, or an ExportError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ExportError("export.formats has gguf, which needs the gguf package: pip install gguf==0.19.0") from None
    return gguf


def file_name(stem: str, gguf_type: str) -> str:
    """'tuned-q8_0.gguf' for stem 'tuned'.

    >>> file_name("tuned", "q8_0")
    'tuned-q8_0.gguf'
    """
    return f"{stem}-{gguf_type}.gguf"


# --- metadata ------------------------------------------------------------------------------------------------


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings of a config.json, whichever way transformers wrote them (rope_parameters, or rope_scaling
    beside rope_theta); a scaling in the older rope_scaling key wins over a default rope_parameters.

    >>> rope_parameters({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
    ...                  "rope_scaling": {"type": "yarn", "factor": 4.0}})["rope_type"]
    'yarn'
    """
    params = dict(config.get("rope_parameters") or {})
    legacy = dict(config.get("rope_scaling") or {})
    if legacy.get("rope_type", legacy.get("type", "default")) != "default":
        params.update(legacy)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.pop("type", None) or params.get("rope_type") or "default"
    return params


def write_metadata(writer: Any, config: dict[str, Any], gguf_type: str, name: str) -> None:
    """General and architecture keys llama.cpp reads (sizes, heads, norms, RoPE)."""
    gguf = gguf_types_module()
    writer.add_name(name)
    writer.add_file_type(file_type(gguf_type))
    if gguf_type.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    dim = head_dim(config)
    if dim != config["hidden_size"] // heads:  # Qwen3: heads wider than hidden / heads
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(dim * float(rope.get("partial_rotary_factor", 1.0))))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise ExportError(
            f"GGUF export does not write RoPE scaling '{rope['rope_type']}' ({config.get('model_type')}); it writes "
            "none, linear and llama3. Drop gguf from export.formats for this model."
        )
    if config.get("sliding_window") and config.get("model_type") == "phi3":
        writer.add_sliding_window(int(config["sliding_window"]))


def file_type(gguf_type: str) -> int:
    gguf = gguf_types_module()
    kinds = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    return int(getattr(gguf.LlamaFileType, kinds[gguf_type]))


def llama3_rope_factors(config: dict[str, Any]) -> Any:
    """The per-frequency divisors llama.cpp applies for Llama-3 RoPE scaling (its `rope_freqs` tensor), derived
    from transformers' own RoPE functions: default inverse frequencies over the llama3-scaled ones."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures",)})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, torch.device("cpu"))
    theta = float(rope_parameters(config)["rope_theta"])
    dim = head_dim(config)
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (default / scaled).float()


# --- tensors -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    gguf_name: str
    source: str | None  # the safetensors name; None for a tensor computed here (rope_freqs)
    shape: tuple[int, ...]
    ggml_type: str  # F32, F16, BF16, Q8_0, Q4_0


def tensor_type(gguf_name: str, shape: tuple[int, ...], gguf_type: str) -> str:
    """The GGML type a tensor is stored in: norms and biases F32, else the chosen type with the exceptions above.

    >>> tensor_type("blk.0.attn_norm.weight", (64,), "q8_0"), tensor_type("output.weight", (512, 64), "q4_0")
    ('F32', 'Q8_0')
    >>> tensor_type("blk.0.ffn_down.weight", (64, 100), "q8_0")  # rows of 100 are not blocks of 32
    'F16'
    """
    gguf = gguf_types_module()
    if len(shape) == 1:
        return "F32"
    wanted = gguf_type.upper()
    if gguf_type == "q4_0" and gguf_name in ("token_embd.weight", "output.weight"):
        wanted = "Q8_0"
    block, _ = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, wanted)]
    return wanted if shape[-1] % block == 0 else "F16"


def plan_tensors(merged_dir: Path, config: dict[str, Any], gguf_type: str) -> tuple[list[PlannedTensor], dict]:
    """Every tensor of the GGUF file in order, from the merged checkpoint's headers (nothing is read yet)."""
    gguf = gguf_types_module()
    family = family_of(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.gguf_arch)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    entries = {name: e for path in base_tensor_files(merged_dir) for name, e in read_header(path).items()}
    tied = config.get("tie_word_embeddings", False)
    plan = []
    if rope_parameters(config)["rope_type"] == "llama3":
        plan.append(PlannedTensor("rope_freqs.weight", None, (head_dim(config) // 2,), "F32"))
    for source, entry in entries.items():
        if source == "lm_head.weight" and tied:
            continue  # the embedding serves as output; llama.cpp uses token_embd when output.weight is absent
        gguf_name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export has no llama.cpp name for tensor '{source}' of {config['model_type']}.")
        plan.append(PlannedTensor(gguf_name, source, entry.shape, tensor_type(gguf_name, entry.shape, gguf_type)))
    return plan, entries


def permute_for_rope(weight: Any, n_head: int) -> Any:
    """Reorder a Q or K projection's rows from transformers' rotate-halves layout to llama.cpp's interleaved one."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def source_tensor(planned: PlannedTensor, entries: dict, config: dict[str, Any]) -> Any:
    """The float tensor for one planned GGUF tensor: read, and permuted where llama.cpp's layout needs it."""
    if planned.source is None:
        return llama3_rope_factors(config)
    tensor = read_tensor(entries[planned.source])
    if family_of(config).permute_qk and planned.gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config["num_attention_heads"]
        if planned.gguf_name.endswith("attn_k.weight"):
            heads = config.get("num_key_value_heads") or heads
        tensor = permute_for_rope(tensor, heads)
    return tensor


def encode(tensor: Any, ggml_type: str) -> Any:
    """The tensor's bytes in a GGML type, as a numpy array for GGUFWriter.write_tensor_data."""
    import numpy as np
    import torch

    if ggml_type == "F32":
        return tensor.float().numpy()
    if ggml_type == "F16":
        return tensor.to(torch.float16).numpy()
    if ggml_type == "BF16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    gguf = gguf_types_module()
    qtype = getattr(gguf.GGMLQuantizationType, ggml_type)
    rows = tensor.reshape(-1, tensor.shape[-1])
    chunks = [
        gguf.quants.quantize(rows[i : i + ROWS_PER_CHUNK].float().numpy(), qtype)
        for i in range(0, len(rows), ROWS_PER_CHUNK)
    ]
    return np.concatenate(chunks, axis=0)


def nbytes(planned: PlannedTensor) -> int:
    gguf = gguf_types_module()
    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, planned.ggml_type)]
    count = 1
    for dim in planned.shape:
        count *= dim
    return count // block * size


# --- the file ------------------------------------------------------------------------------------------------


def convert(merged_dir: str | Path, tokenizer: Any, out_path: str | Path, gguf_type: str, name: str) -> dict:
    """Write the merged model in `merged_dir` as a GGUF file of `gguf_type` with the training tokenizer."""
    import numpy as np

    gguf = gguf_types_module()
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"export.gguf_types has '{gguf_type}'; the GGUF export writes {', '.join(GGUF_TYPES)}.")
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    config = json.loads((merged_dir / "config.json").read_text())
    family = family_of(config)
    plan, entries = plan_tensors(merged_dir, config, gguf_type)
    started = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), family.gguf_arch)
    try:
        write_metadata(writer, config, gguf_type, name)
        vocab = _write_vocab(writer, tokenizer, config["vocab_size"])
        for planned in plan:
            qtype = getattr(gguf.GGMLQuantizationType, planned.ggml_type)
            writer.add_tensor_info(planned.gguf_name, planned.shape, np.dtype(np.float32), nbytes(planned), qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress.bar(total=len(plan), desc=f"export: GGUF {gguf_type}", unit="tensor") as shown:
            for planned in plan:
                writer.write_tensor_data(encode(source_tensor(planned, entries, config), planned.ggml_type))
                shown.update(1)
    finally:
        writer.close()
    return {
        "gguf_type": gguf_type,
        "architecture": family.gguf_arch,
        "tensors": len(plan),
        "f16_fallback_tensors": sum(p.ggml_type == "F16" and gguf_type != "f16" and len(p.shape) > 1 for p in plan),
        "bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - started, 2),
        **vocab,
    }


def _write_vocab(writer: Any, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    from llmtune.release.gguf_vocab import write_tokenizer

    return write_tokenizer(writer, tokenizer, vocab_size)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value metadata of a GGUF file (strings, numbers, arrays), read with gguf's GGUFReader."""
    gguf = gguf_types_module()
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def tensor_types(path: str | Path) -> Iterator[tuple[str, str]]:
    """(name, GGML type) of every tensor of a GGUF file."""
    gguf = gguf_types_module()
    for tensor in gguf.GGUFReader(str(path)).tensors:
        yield tensor.name, tensor.tensor_type.name
