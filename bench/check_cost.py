"""The cost of one check on a warm scope, from Python, side by side in one run.

Measures `TieredLimiter.try_acquire` (the Rust table, rpm and tpm limits, no I/O) against a
plain-Python dict limiter with the same semantics and the same Decision result, and the table's
native call alone. Reports the median of several rounds in ns per check and the ratios.

    .venv/bin/python bench/check_cost.py [--scopes 1000] [--rounds 7] [--calls 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time

from tiered_limiter import Decision, TieredLimiter


class DictLimiter:
    """A fixed-window rpm/tpm limiter in plain Python: the in-process baseline."""

    def __init__(self, window: int = 60) -> None:
        self.window = window
        self.scopes: dict[str, list[int]] = {}

    def try_acquire(
        self, scope: str, *, rpm: int | None = None, tpm: int | None = None, tokens: int = 0
    ) -> Decision:
        now = time.time()
        state = self.scopes.get(scope)
        if state is None or now >= state[0] + self.window:
            state = self.scopes[scope] = [math.floor(now), 0, 0]
        if rpm is not None and state[1] + 1 > rpm:
            return Decision(False, 0, state[0] + self.window - now, None, scope)
        if tpm is not None and state[2] + max(tokens, 1) > tpm:
            return Decision(False, None, state[0] + self.window - now, 0, scope)
        state[1] += 1
        state[2] += tokens
        return Decision(
            True,
            None if rpm is None else rpm - state[1],
            0.0,
            None if tpm is None else tpm - state[2],
        )


def _time(fn, scopes: list[str], calls: int) -> float:
    n = len(scopes)
    started = time.perf_counter_ns()
    for i in range(calls):
        fn(scopes[i % n], rpm=2**31, tpm=2**31, tokens=10)
    return (time.perf_counter_ns() - started) / calls


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scopes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    scopes = [f"api_key:{i:064x}" for i in range(args.scopes)]

    async with TieredLimiter(None, window=60) as tier:
        dict_limiter = DictLimiter()
        table = tier._table  # the native call alone, without the Python wrapper
        now = time.time()
        for s in scopes:
            assert tier.try_acquire(s, rpm=2**31, tpm=2**31, tokens=10) is not None
            dict_limiter.try_acquire(s, rpm=2**31, tpm=2**31, tokens=10)

        def native(scope: str, *, rpm: int, tpm: int, tokens: int) -> object:
            return table.check_one(scope, rpm, tpm, tokens, now, 60, 1, offline=True)

        results: dict[str, list[float]] = {"tier": [], "dict": [], "native": []}
        for _ in range(args.rounds):
            results["tier"].append(_time(tier.try_acquire, scopes, args.calls))
            results["dict"].append(_time(dict_limiter.try_acquire, scopes, args.calls))
            results["native"].append(_time(native, scopes, args.calls))

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"scopes={args.scopes} calls/round={args.calls} rounds={args.rounds}")
    for name, label in [
        ("tier", "TieredLimiter.try_acquire"),
        ("dict", "plain-Python dict limiter"),
        ("native", "Table.check_one (native call only)"),
    ]:
        print(f"  {label:36} median {med[name]:7.0f} ns/check")
    print(f"  tier / dict = {med['tier'] / med['dict']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
