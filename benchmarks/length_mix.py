"""A realistic mix of example lengths for instruction data: most examples short, a long tail up to the limit.

Lengths follow a log-normal law with median `median` tokens, cut to [`min_length`, `max_length`]. With the
defaults (median 250, sigma 0.9, limit 2048) about 1% of examples reach the limit and the mean is about 370,
close to the token-length spread of public instruction sets such as Alpaca-style and chat SFT mixes, whose
medians are a few hundred tokens with a tail of long answers. Seeded, so every run trains on the same mix.

Example:
    >>> lengths = sample_lengths(10_000, max_length=2048, seed=0)
    >>> sorted(lengths)[5_000], max(lengths), min(lengths) >= 16
    (253, 2048, True)
"""

from __future__ import annotations

import math
import random


def sample_lengths(
    count: int, max_length: int = 2048, median: int = 250, sigma: float = 0.9, min_length: int = 16, seed: int = 0
) -> list[int]:
    """`count` example lengths in tokens from the log-normal mix, the same for the same seed."""
    rng = random.Random(seed)
    mu = math.log(median)
    return [min(max_length, max(min_length, round(rng.lognormvariate(mu, sigma)))) for _ in range(count)]


def describe(lengths: list[int]) -> dict[str, float]:
    """Median, mean, 99th percentile and maximum of a length list."""
    ordered = sorted(lengths)
    return {
        "median": ordered[len(ordered) // 2],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p99": ordered[int(0.99 * (len(ordered) - 1))],
        "max": ordered[-1],
    }


if __name__ == "__main__":
    print(describe(sample_lengths(100_000)))
