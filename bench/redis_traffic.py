"""Redis commands per request under steady load over many scopes, tier against Redis-per-request.

Drives one process's limiter at a steady rate over `--scopes` API keys (rpm and tpm limits with
headroom) against a throwaway redis-server, for `--seconds`, and counts what Redis executed
(INFO commandstats, script internals included) and the round trips. The same workload then runs
through the exact script on every request, as LiteLLM's own limiter goes to Redis each time.

    .venv/bin/python bench/redis_traffic.py [--scopes 1000] [--rate 20000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import redis

from tiered_limiter import TieredLimiter
from tiered_limiter._redis import Call, RedisBackend
from tiered_limiter._server import RedisServer


def commands(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats")
    total = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
    scripts = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return total, scripts


async def drive(acquire, scopes: list[str], rate: float, seconds: float) -> int:
    """Send `rate` requests a second for `seconds`, in steps of 10 ms; returns the count."""
    sent = 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            await acquire(scopes[sent % len(scopes)])
            sent += 1
        await asyncio.sleep(0.01)  # pacing the load, not waiting for a result
    return sent


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scopes", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    scopes = [f"api_key:{i:064x}" for i in range(args.scopes)]

    with RedisServer() as server:
        client = server.client()
        before = commands(client)
        async with TieredLimiter(server.url, sync_interval=args.interval) as lim:

            async def tier(scope: str) -> None:
                await lim.acquire(scope, rpm=10**9, tpm=10**9, tokens=100)

            sent = await drive(tier, scopes, args.rate, args.seconds)
            stats = lim.stats()
        after = commands(client)
        tier_cmds = (after[0] - before[0]) / sent
        print(
            f"tier, interval {args.interval}s: {sent} requests over {args.scopes} scopes,"
            f" {after[0] - before[0]} Redis commands ({after[1] - before[1]} scripts),"
            f" {stats['redis_round_trips']} round trips"
        )
        print(
            f"  commands/request {tier_cmds:.4f}, round trips/request "
            f"{stats['redis_round_trips'] / sent:.4f}"
        )

        rc = redis.asyncio.Redis.from_url(server.url)
        backend = RedisBackend(rc, namespace="base", window=60, clock=None)

        async def every(scope: str) -> None:
            await backend.acquire([Call(scope, 10**9, 10**9)], 100)

        before = commands(client)
        base_sent = await drive(every, scopes, args.rate, min(args.seconds, 3))
        after = commands(client)
        await rc.aclose()
        base_cmds = (after[0] - before[0]) / base_sent
        print(f"Redis on every request: {base_sent} requests, commands/request {base_cmds:.2f}")
        print(f"  ratio every-request / tier = {base_cmds / tier_cmds:.0f}x")
        client.close()


if __name__ == "__main__":
    asyncio.run(main())
