"""Merge the adapter onto the original 16-bit base, verify the merge, and write the export formats.

Formats (`export.formats`):

- `adapter`: the PEFT adapter, its `base_model_name_or_path` pointing at the original base
  (`model.name`), so plain `peft.AutoPeftModelForCausalLM.from_pretrained(dir)` loads it.
- `merged_16bit`: the adapter merged into the original 16-bit base weights, read from the base's
  safetensors and written tensor by tensor as sharded safetensors (`export.max_shard_size`). Only one
  tensor is in memory at a time, so peak memory stays far below one 16-bit copy of the model
  (`benchmarks/merge_memory.py` measures it for the Llama-3.2-1B shape).
- `merged_4bit`: the merged 16-bit model re-quantized with the run's bitsandbytes settings.

Why the original 16-bit base and not the dequantized 4-bit one: the merged model is meant to be
used as a normal 16-bit model, and the NF4 rounding of the base is not something to bake in. The
adapter was trained on the NF4 base, though, so the merged model differs from what was trained and
evaluated by the base's quantization error. The merge check therefore has two parts:

1. the gate: the merged model (loaded from disk with plain transformers) against the 16-bit base +
   adapter through PEFT, on eval prompts. Both compute the same function, so the logits may differ
   only by the rounding of the merged weights to `export.dtype`: `merge_check_atol` (0.25 for
   bfloat16 on the demo model) bounds that. The greedy answers must be identical, except where they
   first part at a near tie (the reference scored both tokens within `merge_check_atol`), which that
   same rounding may flip; such flips are counted in the result. The adapter must also move the logits
   by more than the tolerance, or the merge could not be told apart from the base.
2. a report, not a gate: the merged model against the NF4 base + adapter (the model that was trained
   and evaluated): its largest logit gap and the share of greedy answers that agree. This is the
   quantization gap; it is larger than the gate's tolerance and says how far the published model is
   from the evaluated one.

Example:
    >>> max_logit_gap([[0.0, 1.0]], [[0.0, 1.25]])
    0.25
    >>> parse_size("2GB"), parse_size("512KB")
    (2000000000, 512000)
"""

from __future__ import annotations

import gc
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.backends import hf
from llmtune.config import ExportConfig, ModelConfig

ADAPTER_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
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


class ExportError(RuntimeError):
    """The export cannot be made as configured; the message says what to change."""


class MergeCheckFailed(RuntimeError):
    """The merged model does not reproduce base+adapter; it must not be published."""


def parse_size(text: str) -> int:
    """Bytes in a size like '2GB', '500MB' or '1024' (decimal units, as the Hub uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if not match:
        raise ExportError(f"Size '{text}' is not like 2GB, 500MB or 1024.")
    unit = {"KB": 10**3, "MB": 10**6, "GB": 10**9}.get(match.group(2) or "B", 1)
    return int(float(match.group(1)) * unit)


# --- the original 16-bit base -------------------------------------------------------------------


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


# --- safetensors, one tensor at a time ------------------------------------------------------------
# Plain reads instead of safetensors' memory map: mapped pages count in the process's resident set,
# so reading a whole checkpoint through a map would hold it all in RSS while merging.


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
        nbytes = _numel(shape) * _itemsize(dtype)
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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _itemsize(dtype: str) -> int:
    import torch

    return int(getattr(torch, SAFETENSORS_DTYPES[dtype]).itemsize)


def _torch_uint8() -> Any:
    import torch

    return torch.uint8


def safetensors_name(torch_dtype: Any) -> str:
    """'BF16' for torch.bfloat16, and so on."""
    by_torch = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    return by_torch[str(torch_dtype).removeprefix("torch.")]


# --- the LoRA deltas --------------------------------------------------------------------------------


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
    for key, tensor in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():
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


# --- the streaming merge ----------------------------------------------------------------------------


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

    def merged(name: str) -> Any:
        tensor = read_tensor(entries[name])
        if name in deltas:
            tensor = deltas[name].apply(tensor)
        return tensor.to(getattr(torch, dtype)) if tensor.is_floating_point() else tensor

    for file_name, shard in shards.items():
        write_safetensors(out / file_name, shard, (merged(name) for name, _, _ in shard))
    _write_index(out, shards)
    _write_model_config(Path(base_dir), out, dtype)
    return {
        "merged_lora_modules": len(deltas),
        "merged_shards": len(shards),
        "merged_bytes": sum(f.stat().st_size for f in out.iterdir()),
    }


def _is_float(dtype: str) -> bool:
    return dtype in {"F16", "BF16", "F32", "F64"}


def plan_shards(specs: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> dict[str, list]:
    """Group tensors into shard files of at most `max_bytes` each (a larger tensor gets its own shard).

    >>> list(plan_shards([("a", "F16", (4,)), ("b", "F16", (4,)), ("c", "F16", (4,))], max_bytes=16))
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    groups: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = _numel(spec[2]) * _itemsize(spec[1])
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups, start=1)}


def _write_index(out: Path, shards: dict[str, list]) -> None:
    if len(shards) == 1:
        return
    total = sum(_numel(shape) * _itemsize(dtype) for shard in shards.values() for _, dtype, shape in shard)
    weight_map = {name: file_name for file_name, shard in shards.items() for name, _, _ in shard}
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_model_config(base_dir: Path, out: Path, dtype: str) -> None:
    """The base's config.json with the new dtype (and without any quantization), and its generation config."""
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")


# --- merged 4-bit and the adapter folder -----------------------------------------------------------------


def quantize_merged(merged_dir: str | Path, out_dir: str | Path, cfg: ModelConfig) -> Path:
    """The merged 16-bit model loaded with the run's bitsandbytes 4-bit settings and saved (loads with plain
    transformers where bitsandbytes is installed)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(merged_dir), quantization_config=hf.bnb_config(cfg), device_map=hf.device_map(), use_safetensors=True
    )
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, cfg: ModelConfig) -> Path:
    """Copy the adapter and point its config at the original base, so plain PEFT loads it from anywhere.

    (Training saw the 4-bit copy in a temporary folder; that path means nothing to anyone else.)
    """
    out = copy_tree(adapter_dir, out_dir)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = cfg.name
    config["revision"] = cfg.revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def copy_tree(src: str | Path, dst: str | Path) -> Path:
    """Copy a folder, replacing what is at `dst`."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# --- the merge check ---------------------------------------------------------------------------------------


@dataclass
class PromptOutputs:
    logits: Any  # float32 logits over the prompt, on the CPU
    greedy: list[int]  # greedy continuation token ids
    step_scores: Any  # float32 (steps, vocab): the scores each greedy token was chosen from


def max_logit_gap(a: Any, b: Any) -> float:
    """Largest absolute difference between two logit arrays of the same shape."""
    import torch

    return float((torch.as_tensor(a, dtype=torch.float32) - torch.as_tensor(b, dtype=torch.float32)).abs().max())


def prompt_outputs(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[PromptOutputs]:
    """Prompt logits and the greedy continuation of each prompt, with the scores behind each choice."""
    import torch

    results = []
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            logits = model(**ids).logits.float().cpu()[0]
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
        greedy = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
        results.append(PromptOutputs(logits, greedy, torch.stack([s[0].float().cpu() for s in out.scores])))
    return results


def compare(got: list[PromptOutputs], want: list[PromptOutputs]) -> tuple[float, float]:
    """(largest prompt-logit gap, share of prompts with identical greedy continuations)."""
    gap = max(max_logit_gap(g.logits, w.logits) for g, w in zip(got, want, strict=True))
    same = sum(g.greedy == w.greedy for g, w in zip(got, want, strict=True)) / len(want)
    return gap, same


def near_tie_divergence(got: PromptOutputs, want: PromptOutputs, margin: float) -> bool:
    """Whether two greedy continuations first part where the reference scored both tokens within `margin`:
    a near tie, which rounding the weights to 16 bits may flip. Identical continuations are not a divergence.

    >>> import torch
    >>> want = PromptOutputs(None, [5, 1], torch.tensor([[0.0] * 5 + [2.0, 1.99], [0.0] * 7]))
    >>> near_tie_divergence(PromptOutputs(None, [6, 2], None), want, margin=0.05)
    True
    >>> near_tie_divergence(PromptOutputs(None, [0, 2], None), want, margin=0.05)
    False
    """
    step = next((i for i, (a, b) in enumerate(zip(got.greedy, want.greedy, strict=False)) if a != b), None)
    if step is None:
        return False
    scores = want.step_scores[step]
    return float(scores[want.greedy[step]] - scores[got.greedy[step]]) <= margin


def greedy_divergences(got: list[PromptOutputs], want: list[PromptOutputs], margin: float) -> tuple[int, int]:
    """(prompts whose greedy answers differ at a near tie, prompts whose answers differ otherwise)."""
    differ = [(g, w) for g, w in zip(got, want, strict=True) if g.greedy != w.greedy]
    ties = sum(near_tie_divergence(g, w, margin) for g, w in differ)
    return ties, len(differ) - ties


def _free(model: Any) -> None:
    del model
    gc.collect()


def _outputs_of(load: Callable[[], Any], tokenizer: Any, prompts: list[str], new_tokens: int) -> list[PromptOutputs]:
    """Load a model, run the prompts, let the model go: the check holds one model at a time."""
    model = load()
    try:
        return prompt_outputs(model, tokenizer, prompts, new_tokens)
    finally:
        _free(model)


def reference_outputs(
    base_dir: Path, adapter_dir: Path, tokenizer: Any, prompts: list[str], new_tokens: int
) -> tuple[list[PromptOutputs], list[PromptOutputs]]:
    """(16-bit base + adapter, 16-bit base alone) through PEFT, in float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf.require_adapter_safetensors(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, use_safetensors=True, device_map=hf.device_map()
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with_adapter = prompt_outputs(model, tokenizer, prompts, new_tokens)
    with model.disable_adapter():
        base_alone = prompt_outputs(model, tokenizer, prompts, new_tokens)
    _free(model)
    return with_adapter, base_alone


@dataclass(frozen=True)
class CheckInputs:
    base_dir: Path  # original 16-bit base
    adapter_dir: Path
    quantized_dir: Path | None  # the NF4 base the adapter was trained on (for the quantization-gap report)
    tokenizer: Any
    prompts: list[str]


def check_merge(merged_dir: str | Path, inputs: CheckInputs, cfg: ExportConfig) -> dict[str, Any]:
    """The merge check (see the module docstring): gate fields plus the quantization-gap report."""
    import torch
    from transformers import AutoModelForCausalLM

    prompts, n = inputs.prompts[: cfg.merge_check_prompts], cfg.merge_check_max_new_tokens
    want, base_alone = reference_outputs(inputs.base_dir, inputs.adapter_dir, inputs.tokenizer, prompts, n)
    got = _outputs_of(
        lambda: AutoModelForCausalLM.from_pretrained(
            str(merged_dir), dtype=torch.float32, device_map=hf.device_map(), use_safetensors=True
        ).eval(),
        inputs.tokenizer,
        prompts,
        n,
    )
    gap, same = compare(got, want)
    effect, _ = compare(base_alone, want)
    ties, mismatches = greedy_divergences(got, want, margin=cfg.merge_check_atol)
    result: dict[str, Any] = {
        "merge_check_prompts": len(prompts),
        "merge_check_atol": cfg.merge_check_atol,
        "merge_check_max_logit_gap": round(gap, 5),
        "merge_check_greedy_identical": same == 1.0,
        "merge_check_greedy_near_tie_flips": ties,
        "merge_check_greedy_mismatches": mismatches,
        "merge_check_adapter_effect": round(effect, 5),
    }
    if inputs.quantized_dir is not None:
        result.update(_quantization_gap(got, inputs, prompts, n))
    result["merge_check_failures"] = merge_check_failures(result)
    result["merge_check_passed"] = not result["merge_check_failures"]
    return result


def _quantization_gap(got: list[PromptOutputs], inputs: CheckInputs, prompts: list[str], n: int) -> dict[str, Any]:
    assert inputs.quantized_dir is not None
    quantized_dir = inputs.quantized_dir
    trained = _outputs_of(
        lambda: hf.load_for_inference(quantized_dir, inputs.adapter_dir), inputs.tokenizer, prompts, n
    )
    gap, same = compare(got, trained)
    return {"vs_trained_nf4_max_logit_gap": round(gap, 5), "vs_trained_nf4_greedy_agreement": round(same, 4)}


def merge_check_failures(result: dict[str, Any]) -> list[str]:
    """Why a merge check result must not be published (empty when it may).

    >>> merge_check_failures({"merge_check_max_logit_gap": 0.1, "merge_check_atol": 0.25,
    ...     "merge_check_greedy_identical": True, "merge_check_adapter_effect": 0.1})
    ['the adapter moves the logits by 0.1 only, not more than the tolerance 0.25: ...']
    """
    atol = result["merge_check_atol"]
    failures = []
    if result["merge_check_max_logit_gap"] > atol:
        failures.append(
            f"merged vs base+adapter logits differ by up to {result['merge_check_max_logit_gap']} (allowed {atol})"
        )
    if result.get("merge_check_greedy_mismatches", 0):
        failures.append(
            f"greedy answers of the merged model differ from base+adapter on {result['merge_check_greedy_mismatches']}"
            f" prompts, not at a near tie"
        )
    if result["merge_check_adapter_effect"] <= atol:
        failures.append(
            f"the adapter moves the logits by {result['merge_check_adapter_effect']} only, not more than the "
            f"tolerance {atol}: the merge cannot be told apart from the base"
        )
    return failures


def ensure_passed(result: dict[str, Any]) -> None:
    """Raise MergeCheckFailed with the reasons when the check failed."""
    if not result["merge_check_passed"]:
        raise MergeCheckFailed(
            "Merge check failed, so nothing is exported or published: "
            + "; ".join(result["merge_check_failures"])
            + ". Check that the adapter matches model.name, or raise export.merge_check_atol if only rounding differs."
        )


def check_merged_4bit(merged4_dir: Path, merged16_dir: Path, tokenizer: Any, prompts: list[str], n: int) -> dict:
    """How far the re-quantized 4-bit model is from the merged 16-bit one (informational, not a gate)."""
    import torch
    from transformers import AutoModelForCausalLM

    want = _outputs_of(
        lambda: AutoModelForCausalLM.from_pretrained(
            str(merged16_dir), dtype=torch.float32, device_map=hf.device_map(), use_safetensors=True
        ).eval(),
        tokenizer,
        prompts,
        n,
    )
    got = _outputs_of(
        lambda: AutoModelForCausalLM.from_pretrained(
            str(merged4_dir), device_map=hf.device_map(), use_safetensors=True
        ).eval(),
        tokenizer,
        prompts,
        n,
    )
    gap, same = compare(got, want)
    return {"merged_4bit_max_logit_gap": round(gap, 5), "merged_4bit_greedy_agreement": round(same, 4)}


# --- the whole export -----------------------------------------------------------------------------------------

FOLDER_NAMES = {"adapter": "adapter", "merged_16bit": "merged", "merged_4bit": "merged-4bit"}


@dataclass(frozen=True)
class ExportJob:
    model: ModelConfig  # the original base (name, revision) and the run's 4-bit settings
    quantized_dir: Path  # the NF4 copy the adapter was trained on
    adapter_dir: Path
    tokenizer: Any  # carries the training chat template
    prompts: list[str]


def merge_and_check(job: ExportJob, cfg: ExportConfig, work_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Stream-merge onto the original 16-bit base into `work_dir/merged`, then run the merge check."""
    base_dir = resolve_base_checkpoint(job.model)
    merged = Path(work_dir) / FOLDER_NAMES["merged_16bit"]
    info = merge_streaming(base_dir, job.adapter_dir, merged, cfg.dtype, cfg.max_shard_size)
    job.tokenizer.save_pretrained(str(merged))
    inputs = CheckInputs(base_dir, Path(job.adapter_dir), Path(job.quantized_dir), job.tokenizer, job.prompts)
    result = check_merge(merged, inputs, cfg)
    return merged, {**result, **info}


def write_formats(job: ExportJob, cfg: ExportConfig, merged_dir: Path, work_dir: str | Path) -> dict[str, Path]:
    """The folders of `cfg.formats` under `work_dir`, each with the training tokenizer; `merged_dir` is reused."""
    folders: dict[str, Path] = {}
    work = Path(work_dir)
    if "adapter" in cfg.formats:
        folders["adapter"] = export_adapter(job.adapter_dir, work / FOLDER_NAMES["adapter"], job.model)
    if "merged_16bit" in cfg.formats:
        folders["merged_16bit"] = merged_dir
    if "merged_4bit" in cfg.formats:
        folders["merged_4bit"] = quantize_merged(merged_dir, work / FOLDER_NAMES["merged_4bit"], job.model)
    for folder in folders.values():
        job.tokenizer.save_pretrained(str(folder))  # the training chat template travels with every format
    return folders
