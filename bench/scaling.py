"""How a warm check's cost grows with the number of tracked scopes (1k to 1M), one run.

For each size, a fresh limiter (no Redis, `max_scopes` 1M, or 1.1x the size when that is
more, so that no scope is evicted) holds that many scopes, and `try_acquire` is timed in two
access patterns, each beside the plain-Python dict limiter of `check_cost.py` fed the same
order:

- uniform: every check picks a scope at random among all of them, the worst case for any
  cache: at 1M scopes nearly every check misses the CPU caches for the scope string, its
  index slot and its entry. The dict pays the same misses, which shows what they cost any
  limiter keyed by name;
- hot: checks go to 1,000 scopes picked at random among all of them while the rest stay
  tracked, as in a proxy whose traffic comes from a few keys among many remembered ones:
  what the size of the table itself adds to a check.

`floor uniform` is a function with the same call shape that only takes each scope string's
length, in the uniform order: what reaching the caller's own strings costs at that size,
before any limiter looks them up.

Reports the median ns per check over several rounds (sizes interleaved round by round, so
that a busy moment on a shared machine hits every size alike) and the ratio of each size to
the smallest.

    .venv/bin/python bench/scaling.py [--sizes 1000 10000 100000 1000000] [--calls 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable

from check_cost import LIMIT, DictLimiter

from tiered_limiter import TieredLimiter

HOT = 1000


def touch(scope: str, **limits: int) -> int:
    """The floor: a call that reaches the scope string and nothing else."""
    return len(scope)


def timed(acquire: Callable[..., object], order: list[str]) -> float:
    started = time.perf_counter_ns()
    for s in order:
        acquire(s, rpm=LIMIT, tpm=LIMIT, tokens=1)
    return (time.perf_counter_ns() - started) / len(order)


class Size:
    """One table size: a limiter and a dict limiter holding `size` scopes, and two orders."""

    def __init__(self, size: int, calls: int) -> None:
        self.size = size
        names = [f"api_key:{i:064x}" for i in range(size)]
        rng = random.Random(size)
        self.uniform = [names[rng.randrange(size)] for _ in range(calls)]
        hot = rng.sample(names, min(HOT, size))
        self.hot = [hot[rng.randrange(len(hot))] for _ in range(calls)]
        self.names = names
        # Shards fill unevenly: a table holds about 99.7% of max_scopes before it must evict.
        self.tier = TieredLimiter(None, window=60, max_scopes=max(1_000_000, size * 11 // 10))
        self.plain = DictLimiter()
        self.times: dict[str, list[float]] = {
            k: [] for k in ("tier uniform", "dict uniform", "tier hot", "dict hot", "floor uniform")
        }

    def fill(self) -> None:
        for s in self.names:
            decision = self.tier.try_acquire(s, rpm=LIMIT, tpm=LIMIT, tokens=1)
            assert decision is not None
            assert decision.allowed
            self.plain.try_acquire(s, rpm=LIMIT, tpm=LIMIT, tokens=1)
        assert self.tier.stats()["scopes"] == self.size

    def round(self) -> None:
        self.times["tier uniform"].append(timed(self.tier.try_acquire, self.uniform))
        self.times["dict uniform"].append(timed(self.plain.try_acquire, self.uniform))
        self.times["tier hot"].append(timed(self.tier.try_acquire, self.hot))
        self.times["dict hot"].append(timed(self.plain.try_acquire, self.hot))
        self.times["floor uniform"].append(timed(touch, self.uniform))

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.times.items()}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = [Size(n, args.calls) for n in args.sizes]
    for s in sizes:
        await s.tier.start()
        s.fill()
    for _ in range(args.rounds):
        for s in sizes:
            s.round()
    for s in sizes:
        await s.tier.close()

    print(
        f"{args.calls} checks per round, {args.rounds} rounds, medians in ns/check "
        f"(x = ratio to the smallest size); hot = {HOT} scopes among all"
    )
    base = sizes[0].medians()
    print(
        f"{'scopes':>9}  {'tier uniform':>16}  {'dict uniform':>16}  {'tier hot':>16}"
        f"  {'dict hot':>16}  {'floor uniform':>16}  tier/dict uniform, hot"
    )
    for s in sizes:
        m = s.medians()
        cells = "  ".join(
            f"{m[k]:>7.0f} ({m[k] / base[k]:4.2f}x)"
            for k in ("tier uniform", "dict uniform", "tier hot", "dict hot", "floor uniform")
        )
        ratios = f"{m['tier uniform'] / m['dict uniform']:.2f}, {m['tier hot'] / m['dict hot']:.2f}"
        print(f"{s.size:>9}  {cells}  {ratios}")


if __name__ == "__main__":
    asyncio.run(main())
