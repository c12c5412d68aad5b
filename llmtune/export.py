"""Merge the adapter into a 16-bit copy of the base and verify the result before anyone uses it.

The 4-bit base is dequantized to the export dtype and the adapter merged into that, so the merged
weights are the ones the adapter was trained against (not the original, unquantized checkpoint).
The saved merged model is then reloaded with plain `transformers` and its logits compared with
base+adapter on real eval prompts; a gap over the tolerance raises `MergeCheckFailed`.

Example:
    >>> max_logit_gap([[0.0, 1.0]], [[0.0, 1.25]])
    0.25
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llmtune.backends import hf
from llmtune.config import ExportConfig


class MergeCheckFailed(RuntimeError):
    """The merged model does not reproduce base+adapter; it must not be published."""


def merge_adapter(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str, tokenizer: Any
) -> Path:
    """Dequantize the 4-bit base, merge the adapter, save a plain 16-bit safetensors model + tokenizer."""
    import torch
    from peft import PeftModel

    base = hf.load_base(base_dir)
    base.dequantize(dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    _plain_copy(merged, getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _plain_copy(model: Any, dtype: Any) -> Any:
    """The same weights in a freshly built model: a dequantized model still carries the 4-bit loader's
    weight conversions, which transformers cannot reverse on save."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    fresh.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True)
    fresh.tie_weights()
    return fresh


def max_logit_gap(a: Any, b: Any) -> float:
    """Largest absolute difference between two logit arrays of the same shape."""
    import torch

    return float((torch.as_tensor(a, dtype=torch.float32) - torch.as_tensor(b, dtype=torch.float32)).abs().max())


def check_merged(
    merged_dir: str | Path, reference_model: Any, tokenizer: Any, prompts: list[str], atol: float
) -> dict[str, Any]:
    """Compare the merged model (loaded with plain transformers) with base+adapter on `prompts`."""
    import torch
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    gaps, same_argmax = [], True
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            want = reference_model(**ids.to(reference_model.device)).logits.float().cpu()
            got = merged(**ids).logits.float()
        gaps.append(max_logit_gap(got, want))
        same_argmax &= bool(torch.equal(got.argmax(-1), want.argmax(-1)))
    result = {
        "merge_check_max_logit_gap": round(max(gaps), 5),
        "merge_check_atol": atol,
        "merge_check_same_argmax": same_argmax,
        "merge_check_prompts": len(prompts),
    }
    result["merge_check_passed"] = result["merge_check_max_logit_gap"] <= atol
    return result


def export(
    base_dir: str | Path,
    adapter_dir: str | Path,
    tokenizer: Any,
    prompts: list[str],
    cfg: ExportConfig,
    work_dir: str | Path,
) -> dict[str, Any]:
    """Merge + verify into `work_dir/merged`; raise MergeCheckFailed when the check fails."""
    merged_dir = merge_adapter(base_dir, adapter_dir, Path(work_dir) / "merged", cfg.dtype, tokenizer)
    reference = hf.load_for_inference(base_dir, adapter_dir)
    result = check_merged(merged_dir, reference, tokenizer, prompts[: cfg.merge_check_prompts], cfg.merge_check_atol)
    if not result["merge_check_passed"]:
        raise MergeCheckFailed(
            f"Merged model differs from base+adapter by up to {result['merge_check_max_logit_gap']} in logits "
            f"(allowed {cfg.merge_check_atol}); not exporting it. Try export.dtype=float16 or check the adapter."
        )
    return {**result, "merged_dir": str(merged_dir)}


def copy_tree(src: str | Path, dst: str | Path) -> Path:
    """Copy a folder, replacing what is at `dst`."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
