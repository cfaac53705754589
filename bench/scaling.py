"""How a warm check's cost grows with the number of tracked scopes (1k to 1M), one run.

For each size, a fresh table holds that many scopes; `try_acquire` then checks scopes picked
at random among them (so larger tables pay their cache misses). Reports the median ns per check
over several rounds and the ratio of each size to the smallest.

    .venv/bin/python bench/scaling.py [--sizes 1000 10000 100000 1000000] [--calls 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from tiered_limiter import TieredLimiter


async def measure(size: int, calls: int, rounds: int) -> float:
    names = [f"api_key:{i:064x}" for i in range(size)]
    rng = random.Random(size)
    order = [names[rng.randrange(size)] for _ in range(calls)]
    async with TieredLimiter(None, window=60, max_scopes=size) as lim:
        for s in names:
            lim.try_acquire(s, rpm=2**31, tpm=2**31, tokens=1)
        samples = []
        for _ in range(rounds):
            started = time.perf_counter_ns()
            for s in order:
                lim.try_acquire(s, rpm=2**31, tpm=2**31, tokens=1)
            samples.append((time.perf_counter_ns() - started) / calls)
    return statistics.median(samples)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = None
    for size in args.sizes:
        ns = await measure(size, args.calls, args.rounds)
        base = base or ns
        print(f"{size:>9} scopes: median {ns:6.0f} ns/check  ({ns / base:.2f}x the smallest)")


if __name__ == "__main__":
    asyncio.run(main())
