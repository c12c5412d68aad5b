"""Peak memory and time of the GGUF export for the Llama-3.2-1B shape on the CPU, against the model's 16-bit size.

The random-init 1B-shape model of `benchmarks/merge_memory.py` (saved in bfloat16, as a merged model is) is
converted by `llmtune.release.gguf.convert` in a fresh process per GGUF type, which reports its peak resident
set (VmHWM, Linux; it includes the interpreter and torch) and the time. The tokenizer is the demo's (the
file's token list is padded to the model's vocabulary); what is measured is the tensors' path. Needs ~2.5 GB
of disk per type plus the checkpoint, and ~3 GB of RAM to build the model.

    python benchmarks/gguf_memory.py                        # q8_0; prints a table and one JSON line
    python benchmarks/gguf_memory.py --types q8_0 q4_0 f16  # several types
    python benchmarks/gguf_memory.py --keep DIR             # keep the built checkpoint in DIR for reruns
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
sys.path.insert(0, str(ROOT))

from benchmarks.merge_memory import build_base, peak_rss  # noqa: E402


def convert_child(model_dir: str, out: str, gguf_type: str) -> None:
    """Runs in a fresh process: import, note the RSS, convert, print the peak RSS as JSON."""
    from llmtune.demo import build_demo_tokenizer, make_demo_rows
    from llmtune.release import gguf

    tokenizer = build_demo_tokenizer(make_demo_rows(50, seed=0))
    baseline = peak_rss()
    started = time.perf_counter()
    info = gguf.convert(model_dir, tokenizer, out, gguf_type, "llama-3.2-1b-shape")
    peak = peak_rss()
    Path(out).unlink()  # the file is not needed, only its size
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "seconds": time.perf_counter() - started, **info}))


def measure(model_dir: Path, gguf_type: str, work: Path, weights: int) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, __file__, "--convert-child", str(model_dir), str(work / f"{gguf_type}.gguf"), gguf_type],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    result["peak_rss_over_bf16_size"] = round(result["peak_rss"] / weights, 3)
    result["convert_rss_over_bf16_size"] = round((result["peak_rss"] - result["baseline_rss"]) / weights, 3)
    result["file_over_bf16_size"] = round(result["bytes"] / weights, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=["q8_0"], choices=["f16", "bf16", "q8_0", "q4_0"])
    parser.add_argument("--keep", help="folder for the built checkpoint (reused if present)")
    parser.add_argument("--convert-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert_child:
        convert_child(*args.convert_child)
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="llmtune-gguf-bench-"))
    model_dir = work / "base"
    if not (model_dir / "config.json").is_file():
        print(f"building the 1B-shape bf16 checkpoint in {work} ...", flush=True)
        build_base(model_dir)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    results = {kind: measure(model_dir, kind, work, weights) for kind in args.types}
    print_table(results, weights)
    print(json.dumps({"model": "Llama-3.2-1B shape (random init)", "bf16_checkpoint_bytes": weights, **results}))


def print_table(results: dict[str, dict[str, Any]], weights: int) -> None:
    gib = 2**30
    print(f"16-bit checkpoint (bf16 safetensors): {weights / gib:.2f} GiB")
    print(f"{'type':<6} {'file GiB':>9} {'RSS before':>11} {'peak RSS':>9} {'peak/16-bit':>12} {'seconds':>8}")
    for kind, r in results.items():
        print(
            f"{kind:<6} {r['bytes'] / gib:>9.2f} {r['baseline_rss'] / gib:>11.2f} {r['peak_rss'] / gib:>9.2f} "
            f"{r['peak_rss_over_bf16_size']:>12.2f} {r['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
