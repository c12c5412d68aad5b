"""Peak memory of the streaming 16-bit merge for the Llama-3.2-1B shape on the CPU, against the model's 16-bit size.

A random-init model of that shape (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads,
vocab 128256, tied embeddings) is saved in bfloat16 with a random rank-16 LoRA adapter on every linear
projection; then a fresh process merges them with `llmtune.release.merge.merge_streaming` and reports its peak
resident set (VmHWM, Linux), which includes the interpreter and torch. Needs ~7 GB of disk and ~3 GB of RAM
(to build the model); the merge itself is what is measured.

    python benchmarks/merge_memory.py            # prints a table and one JSON line
    python benchmarks/merge_memory.py --keep DIR # keep the built checkpoint in DIR for reruns
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLAMA_32_1B: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_base(out: Path) -> int:
    """Save the random-init 1B-shape model in bfloat16; return its weight bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_32_1B), dtype=torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_adapter(base: Path, out: Path, r: int = 16) -> int:
    """A rank-r LoRA adapter with random A and B on every linear projection, in PEFT's saved layout."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    tensors = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS:
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, module.in_features) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, r) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    config.base_model_name_or_path = str(base)
    config.save_pretrained(str(out))
    return len(tensors) // 2


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM). Not ru_maxrss: that survives exec, so a child would
    report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def merge_child(base: str, adapter: str, out: str) -> None:
    """Runs in a fresh process: import, note the RSS, merge, print the peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    from llmtune.release import merge

    baseline = peak_rss()
    started = time.perf_counter()
    info = merge.merge_streaming(base, adapter, out, "bfloat16", max_shard_size="2GB")
    peak = peak_rss()
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "seconds": time.perf_counter() - started, **info}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="folder for the built base and adapter (reused if present)")
    parser.add_argument("--merge-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge_child:
        merge_child(*args.merge_child)
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="llmtune-merge-bench-"))
    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").is_file():
        print(f"building the 1B-shape base and adapter in {work} ...", flush=True)
        build_base(base)
        build_adapter(base, adapter)
    weights = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    child = subprocess.run(
        [sys.executable, __file__, "--merge-child", str(base), str(adapter), str(work / "merged")],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = {"model": "Llama-3.2-1B shape (random init)", "bf16_checkpoint_bytes": weights}
    result |= json.loads(child.stdout.strip().splitlines()[-1])
    result["peak_rss_over_bf16_size"] = round(result["peak_rss"] / weights, 3)
    result["merge_rss_over_bf16_size"] = round((result["peak_rss"] - result["baseline_rss"]) / weights, 3)
    print_table(result)
    print(json.dumps(result))


def print_table(r: dict) -> None:
    gib = 2**30
    rows = [
        ("16-bit checkpoint (bf16 safetensors)", f"{r['bf16_checkpoint_bytes'] / gib:.2f} GiB"),
        ("RSS before the merge (python + llmtune)", f"{r['baseline_rss'] / gib:.2f} GiB"),
        ("peak RSS of the merge process", f"{r['peak_rss'] / gib:.2f} GiB"),
        ("peak RSS / 16-bit size", f"{r['peak_rss_over_bf16_size']:.2f}"),
        ("(peak - before) / 16-bit size", f"{r['merge_rss_over_bf16_size']:.2f}"),
        ("LoRA modules merged, shards written", f"{r['merged_lora_modules']}, {r['merged_shards']}"),
        ("merge time", f"{r['seconds']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
