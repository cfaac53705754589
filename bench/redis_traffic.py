"""Redis traffic per request under steady load, the tier against Redis on every request.

One process's `TieredLimiter` is driven at a steady `--rate` over `--scopes` API keys (rpm
and tpm limits with headroom, every scope charged every interval) against a throwaway
redis-server. After `--warmup` seconds (cold loads, leases growing to the rate), Redis's
own counters are read over `--seconds`: commands executed (INFO commandstats, commands run
inside scripts included), script calls (EVALSHA) and read events (INFO stats
`total_reads_processed`: one per small request, several for a large pipeline), beside the
limiter's own counts of round trips, syncs, cold loads and exact checks, and the CPU the
Redis server used (INFO cpu, user and system, as a share of one core and per request).

Two views of "commands per request": what the proxy sends (script calls, counted by the
limiter: `redis_commands`) and what Redis executes (every command, those run inside scripts
included, which is how LiteLLM's own limiter is counted at about 15 per request).

Per sync it splits what Redis executed, by command name, into the heartbeat script
(`heartbeat.lua`: EVALSHA, TIME, ZADD and ZCARD on every beat, ZREMRANGEBYSCORE and EXPIRE on
the beats that prune), the limiter script calls (EVALSHA and TIME each) and the commands per
scope the limiter script read (one MGET per scope, then its writes), the figures
`docs/capacity.md` builds on. The split comes from Redis's own counts, not from assumptions
about the scripts: every heartbeat runs one ZCARD, every scope read one MGET. Loads and exact
checks in the measured seconds are limiter script calls too, counted in the same split.

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

# Commands only heartbeat.lua runs; EVALSHA, TIME and EXPIRE both scripts run.
HEARTBEAT_ONLY = ("zadd", "zrem", "zcard", "zremrangebyscore")
# Commands only limiter.lua runs.
LIMITER_ONLY = ("mget", "get", "set", "del", "incrby", "incrbyfloat")


def split(d: dict[str, int]) -> dict[str, dict[str, int]]:
    """Split executed commands by name into the heartbeat, the limiter script and the rest.

    Each heartbeat call runs EVALSHA, TIME (no injected clock), ZADD (ZREM when leaving) and
    ZCARD, and ZREMRANGEBYSCORE with EXPIRE when it prunes; the limiter script's EVALSHA,
    TIME and EXPIRE are what remains of those counts.
    """
    cmd = {k.removeprefix("cmd:"): v for k, v in d.items() if k.startswith("cmd:") and v}
    beats = cmd.get("zcard", 0)
    prunes = cmd.get("zremrangebyscore", 0)
    heartbeat = {k: cmd[k] for k in HEARTBEAT_ONLY if k in cmd}
    heartbeat |= {"evalsha": beats, "time": beats, "expire": prunes}
    limiter = {k: cmd[k] for k in LIMITER_ONLY if k in cmd}
    limiter |= {
        "evalsha": cmd.get("evalsha", 0) - beats,
        "time": cmd.get("time", 0) - beats,
        "expire": cmd.get("expire", 0) - prunes,
    }
    known = {*HEARTBEAT_ONLY, *LIMITER_ONLY, "evalsha", "time", "expire"}
    other = {k: v for k, v in cmd.items() if k not in known}
    return {"heartbeat": _nonzero(heartbeat), "limiter": _nonzero(limiter), "other": other}


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def breakdown(d: dict[str, int], syncs: int) -> dict[str, Any]:
    """Per sync: the heartbeat, the limiter script calls and scopes read, per scope read."""
    parts = split(d)
    hb, lim, other = parts["heartbeat"], parts["limiter"], parts["other"]
    syncs = max(syncs, 1)
    scopes = lim.get("mget", 0)
    per_scope = {
        k: v / max(scopes, 1)
        for k, v in sorted(lim.items(), key=lambda kv: -kv[1])
        if k not in ("evalsha", "time")
    }
    return {
        "heartbeat": sum(hb.values()) / syncs,
        "heartbeat_by_name": {k: v / syncs for k, v in hb.items()},
        "prune_share": hb.get("zremrangebyscore", 0) / max(hb.get("zcard", 0), 1),
        "script_calls": lim.get("evalsha", 0) / syncs,
        "script_cmds": (lim.get("evalsha", 0) + lim.get("time", 0)) / syncs,
        "scopes": scopes / syncs,
        "per_scope": sum(per_scope.values()),
        "per_scope_by_name": per_scope,
        "other": sum(other.values()) / syncs,
        "other_by_name": other,
    }


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
    # The INFO calls in the window: the `before` reading's last (cpu), the `after` one's first
    # two (commandstats, then stats, which counts itself).
    d["reads"] -= 3
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
    sent_cmds = stats1["redis_commands"] - stats0["redis_commands"]
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
        "sent_req": sent_cmds / sent,
        "trips_req": trips / sent,
        "syncs_s": syncs / elapsed,
        "loads": stats1["loads"] - stats0["loads"],
        "exact": stats1["exact_checks"] - stats0["exact_checks"],
        "other_trips": trips - syncs,
        "per_sync": per_sync,
        "split": breakdown(d, syncs),
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
) -> list[tuple[int, int, int, float]]:
    """Commands, round trips, scopes read and Redis CPU ms per second, after one request each.

    What a scope costs once its traffic stops: it is synced once more to give back what its
    lease holds beyond one request's worth, then not until `idle_release` (5 s by default)
    gives the rest back; the heartbeat goes on every sync.
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
            seconds_out.append((d["commands"], trips, d.get("cmd:mget", 0), d["cpu_us"] / 1000))
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
        f"{args.seconds} s measured; exec = commands Redis executed, those inside scripts "
        "included; sent = commands the proxy sent (script calls)"
    )
    print(
        f"{'scopes':>6} {'interval':>8} {'req/s':>7} {'exec/s':>8} {'sent/s':>6} "
        f"{'reads/s':>7} {'exec/req':>8} {'sent/req':>8} {'trips/req':>9} {'syncs/s':>7} "
        f"{'exec/sync':>9} {'scopes/sync':>11} {'exec/scope':>10} {'loads':>5} {'exact':>5} "
        f"{'redis cpu':>9} {'cpu us/req':>10}"
    )
    rows = []
    with RedisServer() as server:
        for n in args.scopes:
            for interval in args.interval:
                r = await tier_run(server, n, interval, args)
                rows.append(r)
                b = r["split"]
                print(
                    f"{n:>6} {interval:>8} {r['rps']:>7.0f} {r['cmds_s']:>8.0f} "
                    f"{r['scripts_s']:>6.1f} {r['reads_s']:>7.1f} {r['cmds_req']:>8.4f} "
                    f"{r['sent_req']:>8.5f} {r['trips_req']:>9.5f} {r['syncs_s']:>7.2f} "
                    f"{r['per_sync']:>9.1f} {b['scopes']:>11.1f} {b['per_scope']:>10.2f} "
                    f"{r['loads']:>5} {r['exact']:>5} {r['cpu']:>9.1%} "
                    f"{r['cpu'] / r['rps'] * 1e6:>10.2f}",
                    flush=True,
                )
                print(f"{'':>8} per sync: {describe(b)}", flush=True)
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
                f"{base / r['cmds_req']:.0f}x in commands executed, "
                f"{base_cpu / max(r['cpu'] / r['rps'] * 1e6, 1e-9):.0f}x in Redis CPU"
            )
    print(
        f"idle tail: one request to each of {args.scopes[0]} scopes at interval "
        f"{args.interval[0]} s, then none; each second after: Redis commands (round trips, "
        "scopes read, Redis CPU ms)"
    )
    print("  " + ", ".join(f"{c} ({t}, {m}, {ms:.0f})" for c, t, m, ms in tail))


def describe(b: dict[str, Any]) -> str:
    """One line: the heartbeat, the limiter script calls, and the commands per scope read."""
    hb = ", ".join(f"{k} {v:.2f}" for k, v in b["heartbeat_by_name"].items())
    scope = ", ".join(f"{k} {v:.3f}" for k, v in b["per_scope_by_name"].items())
    line = (
        f"heartbeat {b['heartbeat']:.2f} ({hb}; pruning on {b['prune_share']:.0%} of beats); "
        f"{b['script_calls']:.2f} limiter script calls x (evalsha, time) = "
        f"{b['script_cmds']:.2f}; {b['scopes']:.1f} scopes read x {b['per_scope']:.3f} "
        f"= {b['scopes'] * b['per_scope']:.1f} ({scope})"
    )
    if b["other_by_name"]:
        other = ", ".join(f"{k} {v}" for k, v in b["other_by_name"].items())
        line += f"; other {b['other']:.2f} ({other} in all)"
    return line


if __name__ == "__main__":
    asyncio.run(main())
