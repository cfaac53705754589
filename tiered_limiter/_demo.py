"""`make demo`: three processes play proxies that share limits through one throwaway Redis.

The same workload runs twice, side by side: through the tier, and through a limiter that goes
to Redis on every request (what LiteLLM's own limiter does). It prints what each admitted
against each limit, Redis commands per request, the check's cost and memory per scope.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import statistics
import sys
import time
from typing import Any

import redis

from ._limiter import TieredLimiter
from ._native import Table
from ._redis import Call, RedisBackend
from ._server import RedisServer

PROXIES = 3
KEYS = [f"api_key:{i:064x}" for i in range(1, 5)]
RPM = 300
TPM = 40_000
REQUESTS = 2_000  # per proxy; 6,000 in all, 1,500 per key: five times each key's rpm


async def _every_request(url: str, progress: Any, slot: int) -> dict[str, Any]:
    """The baseline: one atomic Redis script per request, as LiteLLM's limiter works."""
    client = redis.asyncio.Redis.from_url(url)
    backend = RedisBackend(client, namespace="baseline", window=60, clock=None)
    admitted = dict.fromkeys(KEYS, 0)
    costs: list[float] = []
    rng = random.Random(slot)
    for i in range(REQUESTS):
        key = KEYS[i % len(KEYS)]
        tokens = rng.randint(50, 150)
        started = time.perf_counter()
        reply = await backend.acquire([Call(key, RPM, TPM)], tokens)
        costs.append(time.perf_counter() - started)
        admitted[key] += reply.allowed
        progress[slot] = i + 1
    await client.aclose()
    return {"admitted": admitted, "cost": statistics.median(costs)}


async def _tier(url: str, progress: Any, slot: int) -> dict[str, Any]:
    admitted = dict.fromkeys(KEYS, 0)
    costs: list[float] = []
    rng = random.Random(slot)
    async with TieredLimiter(url, sync_interval=0.1, namespace="tier") as limiter:
        deadline = time.monotonic() + 10
        # Until every proxy has announced itself in the heartbeat set, which the sync task
        # refreshes; there is no event to wait on across processes.
        while limiter.stats()["proxies"] < PROXIES and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for i in range(REQUESTS):
            key = KEYS[i % len(KEYS)]
            estimate = rng.randint(50, 150)
            started = time.perf_counter()
            decision = await limiter.acquire(key, rpm=RPM, tpm=TPM, tokens=estimate)
            costs.append(time.perf_counter() - started)
            if decision.allowed:
                admitted[key] += 1
                limiter.record(key, tokens=rng.randint(-20, 20))
            progress[slot] = i + 1
            if i % 64 == 0:
                await asyncio.sleep(0)  # let the sync task run, as a server's other work would
    return {"admitted": admitted, "cost": statistics.median(costs)}


def _proxy(mode: str, url: str, progress: Any, slot: int, out: Any) -> None:
    run = _tier if mode == "tier" else _every_request
    out.put(asyncio.run(run(url, progress, slot)))


def _commands(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment, unused-ignore]
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def _run(mode: str, url: str, client: redis.Redis) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    progress = ctx.Array("i", PROXIES)
    out: Any = ctx.Queue()
    before = _commands(client)
    procs = [ctx.Process(target=_proxy, args=(mode, url, progress, i, out)) for i in range(PROXIES)]
    for p in procs:
        p.start()
    results: list[dict[str, Any]] = []
    tty = sys.stdout.isatty()
    while len(results) < PROXIES:
        if tty:
            done = sum(progress[:])
            print(f"\r  {mode:>13}: {done:5d}/{PROXIES * REQUESTS} requests", end="", flush=True)
        while not out.empty():
            results.append(out.get())
        time.sleep(0.1)  # the progress line's refresh
    for p in procs:
        p.join()
    print(f"\r  {mode:>13}: {PROXIES * REQUESTS}/{PROXIES * REQUESTS} requests, done")
    commands = _commands(client) - before
    admitted = {k: sum(r["admitted"][k] for r in results) for k in KEYS}
    return {
        "admitted": admitted,
        "commands": commands / (PROXIES * REQUESTS),
        "cost_us": statistics.median(r["cost"] for r in results) * 1e6,
    }


def _bytes_per_scope(count: int = 100_000) -> float:
    """The table's own memory per idle scope once `count` scopes are tracked."""
    table = Table(count, 64)
    for i in range(count):
        table.apply(f"api_key:{i:064x}", 1_800_000_000, 1, 100, 1_800_000_001.0, 60)
    table.drain(1_800_000_001.0, 60, 1)
    return table.stats()["memory_bytes"] / count


def main() -> None:
    print(
        f"tiered_limiter demo: {PROXIES} proxies share {len(KEYS)} API keys through one Redis;"
        f" each key allows {RPM} requests and {TPM} tokens a minute;"
        f" {PROXIES * REQUESTS} requests in all."
    )
    with RedisServer() as server:
        client = server.client()
        tier = _run("tier", server.url, client)
        base = _run("every-request", server.url, client)
        client.close()

    print()
    print(f"{'':34}{'tier':>12}{'Redis each request':>22}")
    for i, key in enumerate(KEYS, 1):
        label = f"admitted, key {i} (limit {RPM})"
        print(f"{label:34}{tier['admitted'][key]:>12}{base['admitted'][key]:>22}")
    print(f"{'Redis commands per request':34}{tier['commands']:>12.3f}{base['commands']:>22.3f}")
    print(f"{'check, median (us)':34}{tier['cost_us']:>12.1f}{base['cost_us']:>22.1f}")
    per_scope = _bytes_per_scope()
    print(f"{'memory per scope at 100k (bytes)':34}{per_scope:>12.1f}{'-':>22}")
    print()
    print("Commands are Redis's own count (INFO commandstats), script internals included.")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
