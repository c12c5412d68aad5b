"""Benchmark: dataset preparation speed (read, convert, clean, template, tokenize, mask, write) on Alpaca-sized rows.

    python benchmarks/prepare_speed.py                 # 100,000 rows, target under 60 s on 2 CPU cores
    python benchmarks/prepare_speed.py --rows 20000

Rows are generated from a seed with Alpaca-cleaned-like lengths (instruction 8-25 words, input empty
for 60% of rows else 5-40 words, output 20-200 words; about 700 characters a row). Words come from a
20,000-word pseudo-English lexicon drawn with Zipf frequencies, so the tokenizer (a byte-level BPE with
a 16k vocabulary trained on a sample, ChatML template) sees a realistic mix of common and rare words.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
LETTER_WEIGHTS = [
    12,
    9,
    8,
    7.5,
    7,
    6.7,
    6.3,
    6,
    6,
    4.3,
    4,
    2.8,
    2.8,
    2.4,
    2.4,
    2.2,
    2,
    2,
    1.9,
    1.5,
    1,
    0.8,
    0.2,
    0.2,
    0.1,
    0.1,
]


def lexicon(size: int = 20_000, seed: int = 0) -> tuple[list[str], list[float]]:
    """Pseudo-English words (2-9 letters, English letter frequencies) and Zipf weights for them."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(LETTERS, LETTER_WEIGHTS, k=rng.randint(2, 9))) for _ in range(size)]
    return words, [1 / (rank + 1) for rank in range(size)]


def alpaca_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    vocabulary, weights = lexicon()

    def words(low: int, high: int) -> str:
        return " ".join(rng.choices(vocabulary, weights, k=rng.randint(low, high)))

    return [
        {"instruction": words(8, 25), "input": "" if rng.random() < 0.6 else words(5, 40), "output": words(20, 200)}
        for _ in range(n)
    ]


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (the Rust tokenizer runs on several)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--target-seconds", type=float, default=60.0)
    args = parser.parse_args()

    from llmtune.config import DataConfig
    from llmtune.data import prepare
    from llmtune.demo import build_demo_tokenizer, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="llmtune-bench-"))
    source = write_jsonl(alpaca_rows(args.rows, seed=0), work / "rows.jsonl")
    tokenizer = build_demo_tokenizer(alpaca_rows(3000, seed=1), vocab_size=16_000)
    cfg = DataConfig(source=str(source), max_seq_length=2048, format="auto")

    print(f"preparing {args.rows} rows ...", file=sys.stderr)
    load_before = os.getloadavg()[0]
    cpu_before, started = _cpu_seconds(), time.perf_counter()
    stats = prepare(cfg, tokenizer, work / "prepared")
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_before

    result = {
        "benchmark": "prepare_speed",
        "rows": args.rows,
        "seconds": round(seconds, 2),
        "rows_per_second": round(args.rows / seconds),
        "tokens_per_second": round(stats["train_tokens"] / seconds),
        "median_tokens_per_row": stats["token_length"]["p50"],
        "cpu_seconds": round(cpu_seconds, 2),
        "cpu_cores": os.cpu_count(),
        "load_average_before": round(load_before, 2),  # other work on the machine inflates wall time
        "target_seconds": args.target_seconds,
        "meets_target": seconds * 100_000 / args.rows < args.target_seconds,
    }
    print(f"{'rows':>10} {'seconds':>9} {'cpu s':>7} {'rows/s':>9} {'tokens/s':>10} {'p50 tokens':>10} {'target':>8}")
    print(
        f"{result['rows']:>10} {result['seconds']:>9} {result['cpu_seconds']:>7} {result['rows_per_second']:>9} "
        f"{result['tokens_per_second']:>10} {result['median_tokens_per_row']:>10} "
        f"{'met' if result['meets_target'] else 'MISSED':>8}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
