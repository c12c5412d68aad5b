"""How many rows each source of `data.sources` gives: all of them, or the shares their weights ask for.

- An entry's `fraction` keeps that share of its own rows (a seeded sample) before anything else.
- Without weights every (remaining) row of every source is used, and `data.max_rows` samples from them all.
- With weights, an entry's share of the mix is its weight over the sum of the weights. The mix is the largest
  one those shares allow without repeating a row: the source that runs out first is used in full and sets
  the size (`limited_by`); `data.max_rows` caps the size further. Rows are never repeated.

Counts are whole rows that add up to the mix's size (largest remainders get the leftover rows), computed
with exact fractions so that weights 0.3 and 0.7 over 3 and 7 rows give exactly 3 and 7.

Example:
    >>> plan = plan_mix([100, 10], weights=[1, 1], max_rows=None)
    >>> plan.counts, plan.total, plan.limited_by
    ([10, 10], 20, 1)
    >>> plan_mix([100, 10], weights=[3, 1], max_rows=20).counts
    [15, 5]
    >>> plan_mix([3, 7], weights=[0.3, 0.7], max_rows=None).counts
    [3, 7]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class MixPlan:
    """Rows to draw from each source: `by_weight` is what the shares allow, `counts` that after data.max_rows."""

    shares: list[float]
    by_weight: list[int]
    counts: list[int]
    total: int
    limited_by: int | None  # the source used in full that sets the size; None when data.max_rows does


def after_fraction(rows: int, fraction: float | None) -> int:
    """How many of `rows` an entry's `fraction` keeps (at least one of a source that has any).

    >>> after_fraction(10, 0.25), after_fraction(10, None), after_fraction(3, 0.01), after_fraction(0, 0.5)
    (2, 10, 1, 0)
    """
    if fraction is None or rows == 0:
        return rows
    return min(rows, max(1, round(rows * fraction)))


def plan_mix(available: Sequence[int], weights: Sequence[float], max_rows: int | None) -> MixPlan:
    """The rows to draw from each source so that the mix has the weights' shares (see the module docstring)."""
    shares = _shares(weights)
    sizes = [math.floor(rows / share) for rows, share in zip(available, shares, strict=True)]
    largest = min(sizes)
    total = largest if max_rows is None else min(largest, max_rows)
    return MixPlan(
        shares=[float(share) for share in shares],
        by_weight=_apportion(shares, largest),
        counts=_apportion(shares, total),
        total=total,
        limited_by=sizes.index(largest) if total == largest else None,
    )


def _shares(weights: Sequence[float]) -> list[Fraction]:
    exact = [Fraction(repr(float(w))) for w in weights]  # 0.3 as 3/10, not its nearest binary fraction
    return [w / sum(exact) for w in exact]


def _apportion(shares: Sequence[Fraction], total: int) -> list[int]:
    """Whole rows in proportion to `shares` that add up to `total` (leftovers to the largest remainders).

    No count goes over what its source has: total is at most available / share for every source, so a share
    of it is at most the source's rows, and rounding up happens only below a whole number.
    """
    exact = [share * total for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
