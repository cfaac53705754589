"""The cost of one check on a warm scope, from Python, side by side in one run.

Measures, in ns per check (median of several rounds, each round timing a loop of calls):

- `TieredLimiter.try_acquire` (the Rust table, rpm and tpm limits, no I/O), and the native
  call it makes, `Table.decide_one`, alone (the clock, the attribute reads and building the
  `Decision` excluded);
- `await TieredLimiter.acquire` on the same warm scopes (what an async caller pays);
- a plain-Python dict limiter with the same fixed-window semantics and the same `Decision`,
  and the same limiter building its `Decision` with `tuple.__new__` as the tier does (a
  stricter baseline: NamedTuple's own constructor is a Python function);
- an empty Python call with the same arguments: the loop's own overhead, included in the
  figures above;
- LiteLLM's in-memory path: `_PROXY_MaxParallelRequestsHandler_v3` built on
  `InternalUsageCache(DualCache())` (no Redis), its `async_pre_call_hook` for a key with an
  rpm and a tpm limit, as `ProxyLogging.pre_call_hook` calls it: a fresh request body each
  time, run in its own task so each request gets its own context (LiteLLM keeps per-request
  state in a ContextVar). The cost of an empty task is printed beside it. LiteLLM's local
  store holds 200 entries (about 50 keys), so its keys are `min(--scopes, --litellm-keys)`.
  With a tpm limit the hook estimates the prompt's tokens in a worker thread (most of its
  cost); a second row times keys with an rpm limit only.

    .venv/bin/python bench/check_cost.py [--scopes 1000] [--rounds 7] [--calls 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time
from collections.abc import Callable

from tiered_limiter import Decision, TieredLimiter

LIMIT = 2**31 - 1
_new_tuple = tuple.__new__


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


class DictLimiterFastDecision(DictLimiter):
    """`DictLimiter`, building its `Decision` as the tier does (`tuple.__new__`): stricter."""

    def try_acquire(
        self, scope: str, *, rpm: int | None = None, tpm: int | None = None, tokens: int = 0
    ) -> Decision:
        now = time.time()
        state = self.scopes.get(scope)
        if state is None or now >= state[0] + self.window:
            state = self.scopes[scope] = [math.floor(now), 0, 0]
        if rpm is not None and state[1] + 1 > rpm:
            return _new_tuple(Decision, (False, 0, state[0] + self.window - now, None, scope))
        if tpm is not None and state[2] + max(tokens, 1) > tpm:
            return _new_tuple(Decision, (False, None, state[0] + self.window - now, 0, scope))
        state[1] += 1
        state[2] += tokens
        return _new_tuple(
            Decision,
            (
                True,
                None if rpm is None else rpm - state[1],
                0.0,
                None if tpm is None else tpm - state[2],
                None,
            ),
        )


def empty(scope: str, *, rpm: int | None = None, tpm: int | None = None, tokens: int = 0) -> None:
    return None


def time_loop(fn: Callable[..., object], scopes: list[str], calls: int) -> float:
    n = len(scopes)
    started = time.perf_counter_ns()
    for i in range(calls):
        fn(scopes[i % n], rpm=LIMIT, tpm=LIMIT, tokens=10)
    return (time.perf_counter_ns() - started) / calls


def time_native(table: object, scopes: list[str], calls: int) -> float:
    decide_one = table.decide_one  # type: ignore[attr-defined]
    n = len(scopes)
    now = time.time()
    started = time.perf_counter_ns()
    for i in range(calls):
        decide_one(scopes[i % n], LIMIT, LIMIT, 10, now, 60, 1, True)
    return (time.perf_counter_ns() - started) / calls


async def time_acquire(tier: TieredLimiter, scopes: list[str], calls: int) -> float:
    n = len(scopes)
    started = time.perf_counter_ns()
    for i in range(calls):
        await tier.acquire(scopes[i % n], rpm=LIMIT, tpm=LIMIT, tokens=10)
    return (time.perf_counter_ns() - started) / calls


class LiteLLMInMemory:
    """LiteLLM v3's pre-call hook with no Redis, for `keys` keys with rpm and tpm limits."""

    def __init__(self, keys: int) -> None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        # LiteLLM is an optional extra and takes seconds to import: only this class needs it.
        from litellm.caching.dual_cache import DualCache  # noqa: PLC0415
        from litellm.proxy._types import UserAPIKeyAuth  # noqa: PLC0415
        from litellm.proxy.hooks.parallel_request_limiter_v3 import (  # noqa: PLC0415
            _PROXY_MaxParallelRequestsHandler_v3,
        )
        from litellm.proxy.utils import InternalUsageCache  # noqa: PLC0415

        self.handler = _PROXY_MaxParallelRequestsHandler_v3(InternalUsageCache(DualCache()))
        self.cache = DualCache()
        self.keys = [
            UserAPIKeyAuth(api_key=f"sk-bench-{i}", rpm_limit=LIMIT, tpm_limit=LIMIT)
            for i in range(keys)
        ]
        # With a tpm limit the hook counts the prompt's tokens in a worker thread; without
        # one it does not, which shows what the thread hop costs.
        self.rpm_keys = [
            UserAPIKeyAuth(api_key=f"sk-bench-rpm-{i}", rpm_limit=LIMIT) for i in range(keys)
        ]
        self.limited = UserAPIKeyAuth(api_key="sk-bench-limited", rpm_limit=3, tpm_limit=LIMIT)

    async def pre_call(self, key: object) -> object:
        data = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
        return await self.handler.async_pre_call_hook(
            user_api_key_dict=key, cache=self.cache, data=data, call_type="acompletion"
        )

    async def enforces(self) -> bool:
        """Whether the hook really counts: a key with rpm_limit=3 is refused its 4th request."""
        from fastapi import HTTPException  # noqa: PLC0415  # comes with LiteLLM's proxy extra

        for _ in range(3):
            await asyncio.create_task(self.pre_call(self.limited))
        try:
            await asyncio.create_task(self.pre_call(self.limited))
        except HTTPException as exc:
            return exc.status_code == 429
        return False

    async def time(self, calls: int, *, rpm_only: bool = False) -> float:
        keys = self.rpm_keys if rpm_only else self.keys
        n = len(keys)
        started = time.perf_counter_ns()
        for i in range(calls):
            await asyncio.create_task(self.pre_call(keys[i % n]))
        return (time.perf_counter_ns() - started) / calls


async def time_empty_task(calls: int) -> float:
    async def nothing() -> None:
        return None

    started = time.perf_counter_ns()
    for _ in range(calls):
        await asyncio.create_task(nothing())
    return (time.perf_counter_ns() - started) / calls


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scopes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--litellm-calls", type=int, default=2000)
    parser.add_argument("--litellm-keys", type=int, default=40)
    args = parser.parse_args()
    scopes = [f"api_key:{i:064x}" for i in range(args.scopes)]
    litellm = LiteLLMInMemory(min(args.scopes, args.litellm_keys))
    assert await litellm.enforces(), "LiteLLM's hook did not refuse a key over its rpm limit"
    await litellm.time(200)  # first calls load tiktoken and warm LiteLLM's caches

    async with TieredLimiter(None, window=60) as tier:
        dict_limiter = DictLimiter()
        dict_fast = DictLimiterFastDecision()
        for s in scopes:
            assert tier.try_acquire(s, rpm=LIMIT, tpm=LIMIT, tokens=10) is not None
            dict_limiter.try_acquire(s, rpm=LIMIT, tpm=LIMIT, tokens=10)
            dict_fast.try_acquire(s, rpm=LIMIT, tpm=LIMIT, tokens=10)

        names = ("tier", "native", "acquire", "dict", "dict_fast", "empty")
        names += ("litellm", "litellm_rpm", "task")
        results: dict[str, list[float]] = {k: [] for k in names}
        for _ in range(args.rounds):
            results["tier"].append(time_loop(tier.try_acquire, scopes, args.calls))
            results["native"].append(time_native(tier._table, scopes, args.calls))
            results["acquire"].append(await time_acquire(tier, scopes, args.calls))
            results["dict"].append(time_loop(dict_limiter.try_acquire, scopes, args.calls))
            results["dict_fast"].append(time_loop(dict_fast.try_acquire, scopes, args.calls))
            results["empty"].append(time_loop(empty, scopes, args.calls))
            results["litellm"].append(await litellm.time(args.litellm_calls))
            results["litellm_rpm"].append(await litellm.time(args.litellm_calls, rpm_only=True))
            results["task"].append(await time_empty_task(args.litellm_calls))

    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"scopes={args.scopes} calls/round={args.calls} rounds={args.rounds} "
        f"(LiteLLM: {len(litellm.keys)} keys, {args.litellm_calls} calls/round)"
    )
    rows = [
        ("tier", "TieredLimiter.try_acquire"),
        ("native", "Table.decide_one (native call only)"),
        ("acquire", "await TieredLimiter.acquire"),
        ("dict", "plain-Python dict limiter"),
        ("dict_fast", "same, Decision via tuple.__new__"),
        ("empty", "empty call, same arguments (loop)"),
        ("litellm", "LiteLLM v3 pre-call hook, in memory"),
        ("litellm_rpm", "same, rpm limit only (no token count)"),
        ("task", "empty task (in the LiteLLM figure)"),
    ]
    for name, label in rows:
        print(f"  {label:40} median {med[name]:9.0f} ns/check")
    print(f"  tier / dict = {med['tier'] / med['dict']:.2f}")
    print(f"  tier / dict with tuple.__new__ = {med['tier'] / med['dict_fast']:.2f}")
    print(
        "  tier / dict, loop overhead taken out of both = "
        f"{(med['tier'] - med['empty']) / (med['dict'] - med['empty']):.2f}"
    )
    print(f"  LiteLLM in-memory pre-call hook / tier = {med['litellm'] / med['tier']:.0f}x")
    print(f"  same, rpm limit only / tier = {med['litellm_rpm'] / med['tier']:.0f}x")


if __name__ == "__main__":
    asyncio.run(main())
