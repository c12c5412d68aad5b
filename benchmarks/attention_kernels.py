"""One layer's attention, forward + backward, over a packed batch: the candidate kernels side by side (CUDA).

The batch is --rows packed rows of --seq tokens, filled with examples of the committed length mix
(`benchmarks/length_mix.py`, median 250 tokens), as TRL's packing makes them; the heads are a published
shape's (query heads, key/value heads, head dim). Candidates:
- `varlen`: `llmtune.model.attention.varlen_with_gqa`, torch's varlen FlashAttention over the whole batch
  (key/value heads expanded where torch has no enable_gqa), what the pipeline uses;
- `flex`: torch's flex_attention (compiled) with a document causal block mask, grouped-query native;
- `sdpa-block-mask`: SDPA with a dense block-diagonal mask over each row (transformers' SDPA path);
- `per-example`: one SDPA call per example (Unsloth 2026.10's fallback on torch < 2.12);
- `causal-rows`: plain causal SDPA over the same rows as if each were one example (the full-rows yardstick:
  the same tokens, more attention FLOPs, no masking).
Each is checked against `per-example` (the exact reference) on the same inputs before it is timed; times are
medians of CUDA-event-timed repeats after warm-up. Prints a table and one JSON line.

    python benchmarks/attention_kernels.py --shape llama-3.2-1b
    python benchmarks/attention_kernels.py --shape llama-3.1-8b --json attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128)}


def packed_lengths(rows: int, seq: int, seed: int = 0) -> list[list[int]]:
    """`rows` packed rows as a training batch holds them: examples of the length mix packed best-fit-decreasing
    into rows of at most `seq` tokens, then `rows` of those rows drawn at random (seeded).

    >>> batch = packed_lengths(8, 2048)
    >>> len(batch), all(sum(r) <= 2048 for r in batch), sum(map(len, batch)) > 8 * 2048 / 1000
    (8, True, True)
    """
    import random

    from benchmarks.length_mix import sample_lengths

    packed: list[list[int]] = []
    for n in sorted(sample_lengths(rows * 100, max_length=seq, seed=seed), reverse=True):
        fits = [r for r in packed if sum(r) + n <= seq]
        if fits:
            min(fits, key=lambda r: seq - sum(r) - n).append(n)
        else:
            packed.append([n])
    return random.Random(seed).sample(packed, rows)


def candidates(lengths: list[list[int]]) -> dict[str, Callable[..., Any]]:
    """name -> f(q, k, v) with q (T, H, D), k/v (T, H_kv, D) over all rows' tokens; returns (T, H, D)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from llmtune.model.attention import varlen_with_gqa

    flat = [n for row in lengths for n in row]
    bounds = torch.tensor([0, *flat], device="cuda").cumsum(0, dtype=torch.int32)
    longest = max(flat)
    row_sizes = [sum(r) for r in lengths]
    doc = torch.cat([torch.full((n,), i, device="cuda") for i, n in enumerate(flat)])
    total = doc.numel()
    flex = torch.compile(flex_attention, dynamic=False)
    block = create_block_mask(
        lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), None, None, total, total, device="cuda"
    )
    dense = []
    for row in lengths:
        ids = torch.cat([torch.full((n,), i, device="cuda") for i, n in enumerate(row)])
        dense.append((ids[:, None] == ids[None, :]) & torch.ones(len(ids), len(ids), device="cuda").tril().bool())

    def by_head(x: Any) -> Any:  # (T, H, D) -> (1, H, T, D)
        return x.transpose(0, 1)[None]

    def varlen(q: Any, k: Any, v: Any) -> Any:
        return varlen_with_gqa(q, k, v, bounds, bounds, longest, longest, window_size=(-1, 0), enable_gqa=True)

    def flex_doc(q: Any, k: Any, v: Any) -> Any:
        return flex(by_head(q), by_head(k), by_head(v), block_mask=block, enable_gqa=True)[0].transpose(0, 1)

    def per_segment(sizes: list[int], causal_masks: list[Any] | None = None) -> Callable[..., Any]:
        def run(q: Any, k: Any, v: Any) -> Any:
            parts = zip(q.split(sizes), k.split(sizes), v.split(sizes), strict=True)
            outs = []
            for i, (a, b, c) in enumerate(parts):
                mask = causal_masks[i][None] if causal_masks else None
                q4, k4, v4 = map(by_head, (a, b, c))
                outs.append(F.scaled_dot_product_attention(q4, k4, v4, mask, is_causal=mask is None, enable_gqa=True))
            return torch.cat([o[0].transpose(0, 1) for o in outs])

        return run

    return {
        "per-example": per_segment(flat),
        "varlen": varlen,
        "flex": flex_doc,
        "sdpa-block-mask": per_segment(row_sizes, dense),
        "causal-rows": per_segment(row_sizes),
    }


def time_ms(fn: Callable[..., Any], inputs: tuple[Any, ...], grad: Any, repeats: int = 30) -> float:
    """Median milliseconds of forward + backward, CUDA events, after 5 warm-up calls."""
    import torch

    def once() -> None:
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad)

    for _ in range(5):
        once()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(HEADS))
    p.add_argument("--rows", type=int, default=8, help="packed rows in the batch")
    p.add_argument("--seq", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    import torch

    heads = HEADS[args.shape]
    lengths = packed_lengths(args.rows, args.seq)
    total = sum(map(sum, lengths))
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(total, h, heads[2], device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (heads[0], heads[1], heads[1])
    )
    grad = torch.randn(total, heads[0], heads[2], device="cuda", dtype=torch.bfloat16)
    fns = candidates(lengths)
    reference = fns["per-example"](q, k, v).float()
    rows = []
    for name, fn in fns.items():
        error = float((fn(q, k, v).float() - reference).norm() / reference.norm())
        rows.append({"kernel": name, "ms": round(time_ms(fn, (q, k, v), grad), 3), "rel_error": round(error, 5)})
    examples = sum(map(len, lengths))
    print(f"{args.shape} heads {heads}: {args.rows} rows x {args.seq}, {total} tokens, {examples} examples")
    print(f"{'kernel':16} {'fwd+bwd ms':>10} {'rel. error vs per-example':>26}")
    for r in rows:
        print(f"{r['kernel']:16} {r['ms']:>10.3f} {r['rel_error']:>26.5f}")
    result = {"shape": args.shape, "heads": heads, "tokens": total, "examples": examples, "kernels": rows}
    print("RESULT " + json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
