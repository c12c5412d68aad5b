"""Benchmark: prompts/s of the evaluate step's greedy generation, on the CPU tiny model or the GPU 1B shape.

    python benchmarks/eval_speed.py                          # CPU tiny model: 64 prompts, 32 new tokens, batch 16
    python benchmarks/eval_speed.py --prompts 32 --max-new-tokens 16 --shape demo
    python benchmarks/eval_speed.py --shape llama-3.2-1b --backend unsloth --modes sequential,batched   # GPU

Builds the model (`tiny`: 2 layers, hidden 64; `demo`: the 4-layer, hidden-128 demo base; `llama-3.2-1b`:
a random-init model of the published shape, built on the GPU, with the demo tokenizer), loads it in 4-bit
with a LoRA adapter through the chosen backend's `load_quantized`, `add_lora` and `load_for_inference`
(what the load_base_model, inject_lora and evaluate steps call; `unsloth` is Unsloth's fast inference path),
renders eval prompts from the demo data with the training template, and times
`llmtune.evaluate.scoring.generate_answers` in up to three modes: one prompt at a time without the KV cache
(`sequential-nocache`), one at a time with it (`sequential`), and batched with left padding and the KV cache
(`batched`, what the evaluate step does). On a GPU one untimed batch goes first (kernel set-up). Greedy
decoding gives every mode the same answers up to floating-point ties (checked and reported). Prints a table
and one JSON line. With the defaults on 2 busy CPU cores it takes about 7 minutes, nearly all of it the two
one-at-a-time baselines.
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

MODES = {"sequential-nocache": (False, False), "sequential": (False, True), "batched": (True, True)}


def build_base(shape: str, work: Path, rows: list[dict[str, str]]) -> Path:
    """The 16-bit base model folder (with its tokenizer): the tiny or demo Llama, or a random 1B of the real shape."""
    from benchmarks.model_shapes import build_random_llama
    from llmtune.demo import build_demo_model, build_demo_tokenizer

    if (work / "base" / "config.json").is_file():
        return work / "base"  # built by an earlier run with the same --work (the other backend)
    if shape in ("tiny", "demo"):
        return build_demo_model(work / "base", shape=shape, rows=rows)
    return build_random_llama(work / "base", shape, build_demo_tokenizer(rows))


def build(shape: str, backend_name: str, work: Path, prompts: int) -> tuple[Any, Any, list[str]]:
    """The 4-bit model with its adapter, the prepared tokenizer, and `prompts` rendered eval prompts."""
    from transformers import AutoTokenizer

    from llmtune import data
    from llmtune.artifacts import PreparedData
    from llmtune.config import DataConfig, LoraConfig, ModelConfig
    from llmtune.demo import make_demo_rows, write_jsonl
    from llmtune.model import resolve_backend

    backend = resolve_backend(backend_name)
    rows = make_demo_rows(max(400, prompts * 12), seed=1)
    base = build_base(shape, work, rows)
    run = Path(tempfile.mkdtemp(prefix=f"{backend_name}-", dir=work))
    backend.load_quantized(ModelConfig(name=str(base), backend=backend_name), run / "base4bit")
    backend.add_lora(run / "base4bit", LoraConfig(), run / "adapter")
    source = write_jsonl(rows, run / "rows.jsonl")
    data.prepare(DataConfig(source=str(source), eval_fraction=0.2), AutoTokenizer.from_pretrained(base), run / "prep")
    prepared = PreparedData(str(run / "prep"))
    texts = [p["prompt"] for p in prepared.eval_prompts()][:prompts]
    model = backend.load_for_inference(run / "base4bit", run / "adapter")
    return model, prepared.tokenizer(), texts


def time_mode(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch: int, cache: bool) -> dict:
    from llmtune.evaluate.scoring import generate_answers

    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch, use_cache=cache)
    seconds = time.perf_counter() - start  # the answers are decoded text, so the GPU has finished
    return {"seconds": round(seconds, 2), "prompts_per_s": round(len(prompts) / seconds, 2), "answers": answers}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "demo", "llama-3.2-1b"])
    parser.add_argument("--backend", default="hf", choices=["hf", "unsloth"], help="unsloth needs a CUDA GPU")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of: {', '.join(MODES)}")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work", default=None, help="scratch folder; the built base model is reused from it")
    parser.add_argument("--json", default=None, help="also write the JSON line here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from llmtune.model import import_unsloth_if_used

    import_unsloth_if_used(args.backend)  # before transformers, peft and trl, as the CLI does
    import torch

    torch.manual_seed(0)
    work = Path(args.work or tempfile.mkdtemp(prefix="llmtune-evalspeed-"))
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer, prompts = build(args.shape, args.backend, work, args.prompts)
    if torch.cuda.is_available():  # kernel selection and caches on the first call, not in the timings
        time_mode(model, tokenizer, prompts[: args.batch_size], args.max_new_tokens, args.batch_size, True)
    modes = {name: MODES[name] for name in args.modes.split(",")}
    results = {}
    for name, (batched, cache) in modes.items():
        label = f"batch {args.batch_size}, left padding, KV cache" if batched else name
        size = args.batch_size if batched else 1
        results[label] = time_mode(model, tokenizer, prompts, args.max_new_tokens, size, cache)
    return report(args, results, len(prompts))


def report(args: argparse.Namespace, results: dict[str, dict], prompts: int) -> dict:
    import torch

    answers = [r.pop("answers") for r in results.values()]
    baseline = next(iter(results.values()))["prompts_per_s"]
    print(f"{'mode':<36} {'seconds':>8} {'prompts/s':>10} {'speed-up':>9}")
    for name, r in results.items():
        print(f"{name:<36} {r['seconds']:>8} {r['prompts_per_s']:>10} {r['prompts_per_s'] / baseline:>8.1f}x")
    line = {
        "benchmark": "eval_speed",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        **{k: v for k, v in vars(args).items() if k not in ("work", "json")},
        "prompts": prompts,
        "same_answers_in_every_mode": all(a == answers[0] for a in answers),
        "modes": results,
    }
    print(json.dumps(line))
    if args.json:
        Path(args.json).write_text(json.dumps(line) + "\n")
    return line


if __name__ == "__main__":
    main()
