"""Merge a LoRA adapter into the original 16-bit base, streamed tensor by tensor, and write the other formats.

`merge_streaming` reads the base's safetensors and writes the merged model as sharded safetensors
(`export.max_shard_size`) one tensor at a time, so peak memory stays far below one 16-bit copy of the
model (`benchmarks/merge_memory.py` measures it). LoRA targets get W + scale * B @ A in float32 first
(scale = alpha / r, or alpha / sqrt(r) with rsLoRA); DoRA targets are then rescaled row by row to the
trained magnitudes; modules trained in full (modules_to_save) replace the base's tensors. PiSSA/OLoRA
adapters arrive converted to plain LoRA by the train step (`llmtune.model.lora_variants`).
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
from llmtune.model import hf, lora_variants
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
MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDING_SUFFIX = "embed_tokens.weight"


@dataclass(frozen=True)
class LoraDelta:
    a: Any  # (r, in)
    b: Any  # (out, r)
    scale: float
    magnitude: Any = None  # DoRA: (out,), the trained norm of each output row

    def apply(self, weight: Any) -> Any:
        """weight + scale * B @ A in float32; with DoRA each row then rescaled to its magnitude, as PEFT merges:
        m / ||W + s·B·A|| (row norms over the input dimension) times W + s·B·A.

        >>> import torch
        >>> dora = LoraDelta(torch.zeros(1, 2), torch.zeros(2, 1), 1.0, magnitude=torch.tensor([10.0, 1.0]))
        >>> dora.apply(torch.tensor([[3.0, 4.0], [0.0, 2.0]])).tolist()
        [[6.0, 8.0], [0.0, 1.0]]
        """
        import torch

        merged = weight.float() + self.scale * (self.b.float() @ self.a.float())
        if self.magnitude is None:
            return merged
        norm = torch.linalg.norm(merged, dim=1)
        return merged * (self.magnitude.float() / norm).unsqueeze(1)


@dataclass(frozen=True)
class AdapterChanges:
    """What an adapter does to the base's tensors: LoRA (and DoRA) updates, and tensors it replaces whole
    (modules_to_save, e.g. lm_head.weight), each by the base tensor's name."""

    deltas: dict[str, LoraDelta]
    replaced: dict[str, Any]


def load_lora_deltas(adapter_dir: str | Path) -> dict[str, LoraDelta]:
    """The adapter's LoRA factors by the base weight they apply to ('model.layers.0.self_attn.q_proj.weight')."""
    return load_adapter_changes(adapter_dir).deltas


def load_adapter_changes(adapter_dir: str | Path) -> AdapterChanges:
    """The adapter's LoRA/DoRA updates and its saved modules, by the base tensor each applies to."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    hf.require_adapter_safetensors(adapter_dir)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    _check_supported(config)
    scale = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
    parts: dict[str, dict[str, Any]] = {}
    replaced: dict[str, Any] = {}
    for key, tensor in load_file(str(Adapter(str(adapter_dir)).weights_file)).items():
        name = key.removeprefix(ADAPTER_PREFIX)
        if match := LORA_KEY.match(name):
            parts.setdefault(match["module"] + ".weight", {})[match["part"]] = tensor
        elif match := MAGNITUDE_KEY.match(name):
            parts.setdefault(match["module"] + ".weight", {})["m"] = tensor
        elif config.modules_to_save:
            replaced[name] = tensor
        else:
            raise ExportError(f"Adapter tensor '{key}' is neither a LoRA/DoRA weight nor of a module to save.")
    incomplete = sorted(name for name, p in parts.items() if not {"A", "B"} <= set(p))
    if incomplete:
        raise ExportError(f"Adapter lacks the LoRA A or B factor of {incomplete[:3]}.")
    deltas = {name: LoraDelta(p["A"], p["B"], scale, p.get("m")) for name, p in parts.items()}
    return AdapterChanges(deltas, replaced)


def _check_supported(config: Any) -> None:
    unsupported = {
        "peft_type": config.peft_type != "LORA",
        "fan_in_fan_out": getattr(config, "fan_in_fan_out", False),
        "rank_pattern": bool(getattr(config, "rank_pattern", None)),
        "alpha_pattern": bool(getattr(config, "alpha_pattern", None)),
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise ExportError(
            f"The streaming merge supports LoRA, DoRA, rsLoRA and modules_to_save; this adapter uses {', '.join(used)}."
        )
    if lora_variants.is_residual(config.to_dict()):
        raise ExportError(
            f"This adapter's config says init_lora_weights={config.init_lora_weights}: it was trained on the residual "
            "of the base and never converted to a plain LoRA, so merging it onto the base would be wrong. Adapters "
            "trained here are saved converted; convert this one with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=<its initial adapter>))."
        )


def merge_streaming(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str, max_shard_size: str = "2GB"
) -> dict[str, Any]:
    """Merge the adapter into the 16-bit base tensor by tensor; write sharded safetensors + config.

    Floating-point tensors are cast to `dtype`; LoRA targets get W + scale * B @ A (in float32 first), DoRA
    targets that rescaled row by row, and saved modules (modules_to_save) replace the base's tensor.
    """
    import torch

    changes = load_adapter_changes(adapter_dir)
    deltas = changes.deltas
    entries = {name: e for path in base_tensor_files(Path(base_dir)) for name, e in read_header(path).items()}
    base_config = json.loads((Path(base_dir) / "config.json").read_text())
    replaced, untie = _replacements(changes.replaced, entries, bool(base_config.get("tie_word_embeddings")))
    missing = sorted((set(deltas) | set(replaced)) - set(entries) - {OUTPUT_EMBEDDING})
    if missing:
        raise ExportError(
            f"The adapter changes {missing[:3]} but the base checkpoint '{base_dir}' has no such tensors; "
            f"the adapter was trained on another model or the checkpoint names its tensors differently."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = safetensors_name(getattr(torch, dtype))
    specs = [(name, target if _is_float(e.dtype) else e.dtype, e.shape) for name, e in entries.items()]
    specs += [(name, target, tuple(replaced[name].shape)) for name in replaced if name not in entries]
    shards = plan_shards(specs, parse_size(max_shard_size))

    shown = progress.bar(total=len(specs), desc=f"merge into {dtype}", unit="tensor")

    def merged(name: str) -> Any:
        tensor = replaced[name] if name in replaced else read_tensor(entries[name])
        if name in deltas:
            tensor = deltas[name].apply(tensor)
        shown.update()
        return tensor.to(getattr(torch, dtype)) if tensor.is_floating_point() else tensor

    for file_name, shard in shards.items():
        write_safetensors(out / file_name, shard, (merged(name) for name, _, _ in shard))
    shown.close()
    write_index(out, shards)
    _write_model_config(base_config, Path(base_dir), out, dtype, untie)
    return {
        "merged_lora_modules": len(deltas),
        "merged_dora_modules": sum(d.magnitude is not None for d in deltas.values()),
        "merged_saved_modules": len(changes.replaced),
        "merged_shards": len(shards),
        "merged_bytes": sum(f.stat().st_size for f in out.iterdir()),
    }


def _replacements(saved: dict[str, Any], entries: dict[str, Any], tied: bool) -> tuple[dict[str, Any], bool]:
    """The tensors to replace (or add), and whether the merged model must untie its embeddings.

    A base with tied embeddings stores only the input embedding. The merged model stays tied when the input
    and output embeddings it must compute with are equal (PEFT's ensure_weight_tying saves both, equal);
    otherwise (an adapter that trained one of them alone) it gets an output embedding of its own, untied.
    """
    if not tied or OUTPUT_EMBEDDING in entries or not saved:
        return dict(saved), False
    embedding = next((name for name in entries if name.endswith(INPUT_EMBEDDING_SUFFIX)), None)
    if embedding is None or (embedding not in saved and OUTPUT_EMBEDDING not in saved):
        return dict(saved), False
    input_embedding = saved[embedding] if embedding in saved else read_tensor(entries[embedding])
    output_embedding = saved.get(OUTPUT_EMBEDDING, read_tensor(entries[embedding]))
    if _same(input_embedding, output_embedding):
        return {k: v for k, v in saved.items() if k != OUTPUT_EMBEDDING} | {embedding: input_embedding}, False
    return {**saved, OUTPUT_EMBEDDING: output_embedding}, True


def _same(a: Any, b: Any) -> bool:
    import torch

    return bool(a.shape == b.shape and torch.equal(a.float(), b.float()))


def _is_float(dtype: str) -> bool:
    return dtype in {"F16", "BF16", "F32", "F64"}


def _write_model_config(config: dict[str, Any], base_dir: Path, out: Path, dtype: str, untie: bool = False) -> None:
    """The base's config.json with the new dtype (without any quantization, and with untied embeddings when the
    merge gave the output embedding its own weights), and its generation config."""
    config = dict(config)
    if untie:
        config["tie_word_embeddings"] = False
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")
