"""Merge a LoRA adapter into the original 16-bit base, streamed tensor by tensor, and write the other formats.

`merge_streaming` reads the base's safetensors and writes the merged model as sharded safetensors
(`export.max_shard_size`) one tensor at a time, so peak memory stays far below one 16-bit copy of the
model (`benchmarks/merge_memory.py` measures it). LoRA targets get W + scale * B @ A in float32 first.
The original 16-bit base, not the dequantized 4-bit one: the merged model is meant to be used as a
normal 16-bit model, and the NF4 rounding of the base is not something to bake in
(`llmtune.release.check` measures how far that takes it from the trained model).

Example:
    >>> import torch
    >>> LoraDelta(a=torch.ones(1, 2), b=torch.ones(3, 1), scale=0.5).apply(torch.zeros(3, 2)).tolist()
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune import progress
from llmtune.artifacts import Adapter
from llmtune.model import hf
from llmtune.release.weights import (
    ExportError,
    base_tensor_files,
    parse_size,
    plan_shards,
    read_header,
    read_tensor,
    safetensors_name,
    write_index,
    write_safetensors,
)

ADAPTER_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class LoraDelta:
    a: Any  # (r, in)
    b: Any  # (out, r)
    scale: float

    def apply(self, weight: Any) -> Any:
        """weight + scale * B @ A, computed in float32."""
        return weight.float() + self.scale * (self.b.float() @ self.a.float())


def load_lora_deltas(adapter_dir: str | Path) -> dict[str, LoraDelta]:
    """The adapter's LoRA factors by the base weight they apply to ('model.layers.0.self_attn.q_proj.weight')."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    hf.require_adapter_safetensors(adapter_dir)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    _check_supported(config)
    scale = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(Adapter(str(adapter_dir)).weights_file)).items():
        match = LORA_KEY.match(key.removeprefix(ADAPTER_PREFIX))
        if not match:
            raise ExportError(f"Adapter tensor '{key}' is not a LoRA A/B weight; the merge supports plain LoRA only.")
        parts.setdefault(match["module"] + ".weight", {})[match["part"]] = tensor
    return {name: LoraDelta(p["A"], p["B"], scale) for name, p in parts.items()}


def _check_supported(config: Any) -> None:
    unsupported = {
        "peft_type": config.peft_type != "LORA",
        "use_dora": getattr(config, "use_dora", False),
        "fan_in_fan_out": getattr(config, "fan_in_fan_out", False),
        "rank_pattern": bool(getattr(config, "rank_pattern", None)),
        "alpha_pattern": bool(getattr(config, "alpha_pattern", None)),
        "modules_to_save": bool(getattr(config, "modules_to_save", None)),
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise ExportError(f"The streaming merge supports plain LoRA; this adapter uses {', '.join(used)}.")


def merge_streaming(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str, max_shard_size: str = "2GB"
) -> dict[str, Any]:
    """Merge the adapter into the 16-bit base tensor by tensor; write sharded safetensors + config.

    Floating-point tensors are cast to `dtype`; LoRA targets get W + scale * B @ A (in float32 first).
    """
    import torch

    deltas = load_lora_deltas(adapter_dir)
    entries = {name: e for path in base_tensor_files(Path(base_dir)) for name, e in read_header(path).items()}
    missing = sorted(set(deltas) - set(entries))
    if missing:
        raise ExportError(
            f"The adapter changes {missing[:3]} but the base checkpoint '{base_dir}' has no such tensors; "
            f"the adapter was trained on another model or the checkpoint names its tensors differently."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = safetensors_name(getattr(torch, dtype))
    specs = [(name, target if _is_float(e.dtype) else e.dtype, e.shape) for name, e in entries.items()]
    shards = plan_shards(specs, parse_size(max_shard_size))

    shown = progress.bar(total=len(specs), desc=f"merge into {dtype}", unit="tensor")

    def merged(name: str) -> Any:
        tensor = read_tensor(entries[name])
        if name in deltas:
            tensor = deltas[name].apply(tensor)
        shown.update()
        return tensor.to(getattr(torch, dtype)) if tensor.is_floating_point() else tensor

    for file_name, shard in shards.items():
        write_safetensors(out / file_name, shard, (merged(name) for name, _, _ in shard))
    shown.close()
    write_index(out, shards)
    _write_model_config(Path(base_dir), out, dtype)
    return {
        "merged_lora_modules": len(deltas),
        "merged_shards": len(shards),
        "merged_bytes": sum(f.stat().st_size for f in out.iterdir()),
    }


def _is_float(dtype: str) -> bool:
    return dtype in {"F16", "BF16", "F32", "F64"}


def _write_model_config(base_dir: Path, out: Path, dtype: str) -> None:
    """The base's config.json with the new dtype (and without any quantization), and its generation config."""
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")
