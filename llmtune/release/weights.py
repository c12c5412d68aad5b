"""Safetensors checkpoints read and written one tensor at a time, and where the original 16-bit base lives.

Plain reads instead of safetensors' memory map: mapped pages count in the process's resident set, so
reading a whole checkpoint through a map would hold it all in RSS while merging.

Example:
    >>> parse_size("2GB"), parse_size("512KB")
    (2000000000, 512000)
    >>> list(plan_shards([("a", "F16", (4,)), ("b", "F16", (4,)), ("c", "F16", (4,))], max_bytes=16))
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.config import ModelConfig
from llmtune.errors import LlmtuneError
from llmtune.model import hf

SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}
INDEX_FILE = "model.safetensors.index.json"


class ExportError(LlmtuneError):
    """The export cannot be made as configured; the message says what to change."""


def parse_size(text: str) -> int:
    """Bytes in a size like '2GB', '500MB' or '1024' (decimal units, as the Hub uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if not match:
        raise ExportError(f"Size '{text}' is not like 2GB, 500MB or 1024.")
    unit = {"KB": 10**3, "MB": 10**6, "GB": 10**9}.get(match.group(2) or "B", 1)
    return int(float(match.group(1)) * unit)


def resolve_base_checkpoint(cfg: ModelConfig, cache_dir: str | Path | None = None) -> Path:
    """The folder holding the original base's config and safetensors: `model.name` itself when it is a
    local folder, else the Hub snapshot (downloaded, or read from the cache when offline)."""
    if Path(cfg.name).is_dir():
        hf.require_safetensors(cfg.name)
        return Path(cfg.name)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            cfg.name, revision=cfg.revision, cache_dir=cache_dir, allow_patterns=["*.json", "*.safetensors"]
        )
    except Exception as err:  # the hub client raises many types; the user needs the id and the cause
        raise ExportError(
            f"Could not get the 16-bit base '{cfg.name}' that the merge needs: {type(err).__name__}: {err}"
        ) from None
    return Path(folder)


def base_tensor_files(base_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in index order."""
    index = base_dir / INDEX_FILE
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [base_dir / name for name in names]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ExportError(f"'{base_dir}' has no model.safetensors or {INDEX_FILE}; the merge reads safetensors only.")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors name, e.g. BF16
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, by name, in storage order."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    data_start = 8 + size
    entries = {
        name: TensorEntry(
            path, h["dtype"], tuple(h["shape"]), data_start + h["data_offsets"][0], data_start + h["data_offsets"][1]
        )
        for name, h in header.items()
    }
    return dict(sorted(entries.items(), key=lambda item: item[1].start))


def read_tensor(entry: TensorEntry) -> Any:
    import torch

    if entry.dtype not in SAFETENSORS_DTYPES:
        raise ExportError(f"{entry.file}: tensor dtype {entry.dtype} is not supported by the streaming merge.")
    dtype = getattr(torch, SAFETENSORS_DTYPES[entry.dtype])
    if entry.end == entry.start:
        return torch.empty(entry.shape, dtype=dtype)
    with entry.file.open("rb") as f:
        f.seek(entry.start)
        buffer = bytearray(entry.end - entry.start)
        f.readinto(buffer)  # straight into the tensor's memory: f.read() would hold a second copy
    return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)


def write_safetensors(path: Path, specs: list[tuple[str, str, tuple[int, ...]]], tensors: Iterator[Any]) -> None:
    """Write a safetensors file from (name, dtype, shape) specs, pulling each tensor only when it is written."""
    offsets, header = 0, {}
    for name, dtype, shape in specs:
        nbytes = numel(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offsets, offsets + nbytes]}
        offsets += nbytes
    header_bytes = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for (name, _, shape), tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != shape:
                raise ExportError(f"Tensor {name} has shape {tuple(tensor.shape)}, expected {shape}.")
            f.write(tensor.contiguous().reshape(-1).view(_torch_uint8()).numpy().data)
            del tensor  # before the next one is made, so only one tensor is held at a time


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def itemsize(dtype: str) -> int:
    import torch

    return int(getattr(torch, SAFETENSORS_DTYPES[dtype]).itemsize)


def _torch_uint8() -> Any:
    import torch

    return torch.uint8


def safetensors_name(torch_dtype: Any) -> str:
    """'BF16' for torch.bfloat16, and so on."""
    by_torch = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    return by_torch[str(torch_dtype).removeprefix("torch.")]


def plan_shards(specs: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> dict[str, list]:
    """Group tensors into shard files of at most `max_bytes` each (a larger tensor gets its own shard)."""
    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = numel(spec[2]) * itemsize(spec[1])
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups, start=1)}


def write_index(out: Path, shards: dict[str, list]) -> None:
    if len(shards) == 1:
        return
    total = sum(numel(shape) * itemsize(dtype) for shard in shards.values() for _, dtype, shape in shard)
    weight_map = {name: file_name for file_name, shard in shards.items() for name, _, _ in shard}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
