"""Benchmark: prompts/s of the evaluate step's greedy generation on the CPU tiny model (4-bit NF4 + LoRA).

    python benchmarks/eval_speed.py                          # 64 prompts, 32 new tokens, batch 16 (the defaults)
    python benchmarks/eval_speed.py --prompts 32 --max-new-tokens 16 --shape demo

Builds the tiny Llama (2 layers, hidden 64; `--shape demo` for the 4-layer, hidden-128 demo base),
loads it in 4-bit with a LoRA adapter through the `hf` backend, renders eval prompts from the demo
data with the training template, and times `llmtune.evaluation.generate_answers` three ways:
one prompt at a time without the KV cache, one at a time with it, and batched with left padding and
the KV cache (what the evaluate step does). Greedy decoding gives every mode the same answers (checked),
so the speed-up is for the same output. Prints a table and one JSON line. With the defaults it takes about
7 minutes on 2 busy CPU cores, nearly all of it the two one-at-a-time baselines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(shape: str, work: Path, prompts: int) -> tuple[Any, Any, list[str]]:
    """The 4-bit model with its adapter, the prepared tokenizer, and `prompts` rendered eval prompts."""
    from transformers import AutoTokenizer

    from llmtune import data
    from llmtune.backends import hf
    from llmtune.config import DataConfig, LoraConfig, ModelConfig
    from llmtune.demo import build_demo_model, make_demo_rows, write_jsonl

    rows = make_demo_rows(max(400, prompts * 12), seed=1)
    base = build_demo_model(work / "base", shape=shape, rows=rows)
    hf.load_quantized(ModelConfig(name=str(base)), work / "base4bit")
    hf.add_lora(work / "base4bit", LoraConfig(), work / "adapter")
    source = write_jsonl(rows, work / "rows.jsonl")
    data.prepare(DataConfig(source=str(source), eval_fraction=0.2), AutoTokenizer.from_pretrained(base), work / "prep")
    texts = [p["prompt"] for p in data.read_eval_prompts(work / "prep")][:prompts]
    model = hf.load_for_inference(work / "base4bit", work / "adapter")
    return model, AutoTokenizer.from_pretrained(work / "prep" / "tokenizer"), texts


def time_mode(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch: int, cache: bool) -> dict:
    from llmtune.evaluation import generate_answers

    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch, use_cache=cache)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "prompts_per_s": round(len(prompts) / seconds, 2), "answers": answers}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "demo"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="llmtune-evalspeed-") as tmp:
        model, tokenizer, prompts = build(args.shape, Path(tmp), args.prompts)
        modes = {
            "sequential, no KV cache": (1, False),
            "sequential, KV cache": (1, True),
            f"batch {args.batch_size}, left padding, KV cache": (args.batch_size, True),
        }
        results = {
            name: time_mode(model, tokenizer, prompts, args.max_new_tokens, b, c) for name, (b, c) in modes.items()
        }
    answers = [r.pop("answers") for r in results.values()]
    baseline = next(iter(results.values()))["prompts_per_s"]
    print(f"{'mode':<36} {'seconds':>8} {'prompts/s':>10} {'speed-up':>9}")
    for name, r in results.items():
        print(f"{name:<36} {r['seconds']:>8} {r['prompts_per_s']:>10} {r['prompts_per_s'] / baseline:>8.1f}x")
    line = {
        "benchmark": "eval_speed",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        **vars(args),
        "prompts": len(prompts),
        "same_answers_in_every_mode": all(a == answers[0] for a in answers),
        "modes": results,
    }
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
