"""Redis traffic per request under steady load, the tier against Redis on every request.

One process's `TieredLimiter` is driven at a steady `--rate` over `--scopes` API keys (rpm
and tpm limits with headroom, every scope charged every interval) against a throwaway
redis-server. After `--warmup` seconds (cold loads, leases growing to the rate), Redis's
own counters are read over `--seconds`: commands executed (INFO commandstats, commands run
inside scripts included), script calls (EVALSHA) and read events (INFO stats
`total_reads_processed`: one per small request, several for a large pipeline), beside the
limiter's own counts of round trips, syncs, cold loads and exact checks, and the CPU the
Redis server used (INFO cpu, user and system, as a share of one core and per request). Per
sync it splits the commands into the heartbeat (one script) and the rest per active scope,
and by command name, the figures `docs/capacity.md` builds on.

Several `--scopes` and `--interval` values give one line each. The baseline then runs the
same load through the tier's exact script on every request (LiteLLM's own limiter also goes
to Redis on every request; its figures come from `bench/proxy.py`). Last, the idle tail:
what the first `--scopes` cost, second by second, after each took one request and then none.

    .venv/bin/python bench/redis_traffic.py [--scopes 1000] [--interval 0.1 0.5]
        [--rate 20000] [--seconds 10] [--tail 8]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from tiered_limiter import TieredLimiter
from tiered_limiter._redis import Call, RedisBackend
from tiered_limiter._server import RedisServer

HEARTBEAT_COMMANDS = 6  # EVALSHA, TIME, ZADD, ZREMRANGEBYSCORE, EXPIRE, ZCARD (heartbeat.lua)


def counters(client: redis.Redis) -> dict[str, int]:
    """Commands (in all and by name), script calls and read events so far, INFO excluded."""
    commands = client.info("commandstats")
    reads = int(client.info("stats")["total_reads_processed"])
    cpu = client.info("cpu")
    # Microseconds of CPU the server used (user and system), main thread and all.
    cpu_us = round((float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6)
    by_name = {
        k.removeprefix("cmdstat_"): int(v["calls"])
        for k, v in commands.items()
        if k != "cmdstat_info"
    }
    total = sum(by_name.values())
    scripts = by_name.get("evalsha", 0)
    return {"commands": total, "scripts": scripts, "reads": reads, "cpu_us": cpu_us} | {
        f"cmd:{k}": v for k, v in by_name.items()
    }


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    d = {k: after[k] - before.get(k, 0) for k in after}
    d["reads"] -= 2  # the two INFO calls of the `after` reading
    return d


async def drive(
    acquire: Callable[[str], Awaitable[object]], scopes: list[str], rate: float, seconds: float
) -> int:
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


async def tier_run(
    server: RedisServer, n_scopes: int, interval: float, args: argparse.Namespace
) -> dict[str, Any]:
    scopes = [f"api_key:{n_scopes}-{interval}-{i:058x}" for i in range(n_scopes)]
    client = server.client()
    async with TieredLimiter(server.url, sync_interval=interval) as lim:

        async def acquire(scope: str) -> None:
            decision = await lim.acquire(scope, rpm=10**9, tpm=10**9, tokens=100)
            assert decision.allowed

        await drive(acquire, scopes, args.rate, args.warmup)
        before, stats0 = counters(client), lim.stats()
        started = time.monotonic()
        sent = await drive(acquire, scopes, args.rate, args.seconds)
        elapsed = time.monotonic() - started
        d, stats1 = delta(counters(client), before), lim.stats()
    client.close()
    syncs = stats1["syncs"] - stats0["syncs"]
    trips = stats1["redis_round_trips"] - stats0["redis_round_trips"]
    per_sync = d["commands"] / max(syncs, 1)
    return {
        "scopes": n_scopes,
        "interval": interval,
        "rps": sent / elapsed,
        "cmds_s": d["commands"] / elapsed,
        "scripts_s": d["scripts"] / elapsed,
        "reads_s": d["reads"] / elapsed,
        "cpu": d["cpu_us"] / 1e6 / elapsed,
        "cmds_req": d["commands"] / sent,
        "sent_req": d["scripts"] / sent,
        "by_name": {
            k.removeprefix("cmd:"): v / max(syncs, 1) / n_scopes
            for k, v in sorted(d.items(), key=lambda kv: -kv[1])
            if k.startswith("cmd:") and v
        },
        "trips_req": trips / sent,
        "syncs_s": syncs / elapsed,
        "loads": stats1["loads"] - stats0["loads"],
        "exact": stats1["exact_checks"] - stats0["exact_checks"],
        "other_trips": trips - syncs,
        "per_sync": per_sync,
        "per_scope": (per_sync - HEARTBEAT_COMMANDS) / n_scopes,
    }


async def every_request(
    server: RedisServer, n_scopes: int, args: argparse.Namespace
) -> tuple[float, float]:
    """Commands and Redis CPU microseconds per request when every request runs the script."""
    scopes = [f"api_key:base-{i:059x}" for i in range(n_scopes)]
    rc = redis.asyncio.Redis.from_url(server.url)
    backend = RedisBackend(rc, namespace="", window=60, clock=None)
    client = server.client()

    async def acquire(scope: str) -> None:
        reply = await backend.acquire([Call(scope, rpm=10**9, tpm=10**9)], 100)
        assert reply.allowed

    await drive(acquire, scopes, args.rate, 1.0)
    before = counters(client)
    sent = await drive(acquire, scopes, args.rate, min(args.seconds, 3))
    d = delta(counters(client), before)
    await rc.aclose()
    client.close()
    return d["commands"] / sent, d["cpu_us"] / sent


async def idle_tail(
    server: RedisServer, n_scopes: int, interval: float, seconds: int
) -> list[tuple[int, int, float]]:
    """Commands, round trips and Redis CPU ms per second, after one request per scope.

    What a scope costs once its traffic stops: it is synced while it holds a lease, until
    `idle_release` (5 s by default) gives the lease back.
    """
    scopes = [f"api_key:tail-{interval}-{i:058x}" for i in range(n_scopes)]
    client = server.client()
    seconds_out = []
    async with TieredLimiter(server.url, sync_interval=interval) as lim:
        for scope in scopes:
            decision = await lim.acquire(scope, rpm=10**9, tpm=10**9, tokens=100)
            assert decision.allowed
        for _ in range(seconds):
            before, trips = counters(client), lim.stats()["redis_round_trips"]
            await asyncio.sleep(1.0)
            d = delta(counters(client), before)
            trips = lim.stats()["redis_round_trips"] - trips
            seconds_out.append((d["commands"], trips, d["cpu_us"] / 1000))
    client.close()
    return seconds_out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scopes", type=int, nargs="*", default=[1000])
    parser.add_argument("--interval", type=float, nargs="*", default=[0.1, 0.5])
    parser.add_argument("--rate", type=float, default=20_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--tail", type=int, default=8, help="seconds of idle tail to measure")
    args = parser.parse_args()

    print(
        f"tier: {args.rate:.0f} requests/s offered, {args.warmup} s warm-up, "
        f"{args.seconds} s measured; Redis commands include those run inside scripts"
    )
    print(
        f"{'scopes':>6} {'interval':>8} {'req/s':>7} {'cmds/s':>8} {'scripts/s':>9} "
        f"{'reads/s':>7} {'cmds/req':>8} {'scripts/req':>11} {'trips/req':>9} {'syncs/s':>7} "
        f"{'cmds/sync':>9} {'cmds/scope/sync':>15} {'loads':>5} {'exact':>5} "
        f"{'redis cpu':>9} {'cpu us/req':>10}"
    )
    rows = []
    with RedisServer() as server:
        for n in args.scopes:
            for interval in args.interval:
                r = await tier_run(server, n, interval, args)
                rows.append(r)
                print(
                    f"{n:>6} {interval:>8} {r['rps']:>7.0f} {r['cmds_s']:>8.0f} "
                    f"{r['scripts_s']:>9.1f} {r['reads_s']:>7.1f} {r['cmds_req']:>8.4f} "
                    f"{r['sent_req']:>11.5f} {r['trips_req']:>9.5f} {r['syncs_s']:>7.2f} "
                    f"{r['per_sync']:>9.0f} {r['per_scope']:>15.2f} {r['loads']:>5} "
                    f"{r['exact']:>5} {r['cpu']:>9.1%} {r['cpu'] / r['rps'] * 1e6:>10.2f}",
                    flush=True,
                )
                names = ", ".join(f"{k} {v:.2f}" for k, v in r["by_name"].items())
                print(f"{'':>15} per scope per sync: {names}", flush=True)
        base, base_cpu = await every_request(server, args.scopes[0], args)
        tail = await idle_tail(server, args.scopes[0], args.interval[0], args.tail)
    print(
        f"Redis on every request (exact script), {args.scopes[0]} scopes: "
        f"{base:.2f} commands/request, {base_cpu:.1f} us of Redis CPU/request"
    )
    for r in rows:
        if r["scopes"] == args.scopes[0]:
            print(
                f"  ratio every-request / tier at interval {r['interval']} s: "
                f"{base / r['cmds_req']:.0f}x"
            )
    print(
        f"idle tail: one request to each of {args.scopes[0]} scopes at interval "
        f"{args.interval[0]} s, then none; each second after: Redis commands (round trips, "
        "Redis CPU ms)"
    )
    print("  " + ", ".join(f"{c} ({t}, {ms:.0f})" for c, t, ms in tail))


if __name__ == "__main__":
    asyncio.run(main())
