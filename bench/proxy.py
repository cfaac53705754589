"""A real LiteLLM proxy three ways, side by side in one run: no limits, LiteLLM's own limiter,
and the tier in front of it, with the same rpm and tpm limits on every key.

Each mode is its own `litellm` proxy process (1 worker, a `mock_response` model, the test
suite's `custom_auth` hook handing out per-key limits, so no database) with its own
redis-server as `coordination_redis`, so Redis counters belong to one proxy. The tier proxy
runs with `LITELLM_WORKER_STARTUP_HOOKS=tiered_limiter.litellm:install`. Load comes from this
process on 127.0.0.1: `--requests` chat completions at `--concurrency`, keys taken in turn.
Rounds alternate the modes (A B C A B C ...) so machine noise falls on all of them. Each round
first sends `--round-warmup` requests, not measured, since a key idles while the other modes
run (their Redis commands are printed apart); the report is the median over rounds of:

- requests/s and p50/p99 latency, as the client sees them;
- Redis commands per HTTP request: the INFO commandstats delta of that proxy's Redis
  (commands run inside scripts included, this bench's own INFO calls excluded);
- Redis round trips per HTTP request: the delta of INFO stats `total_reads_processed` (one
  read event per request or pipeline a client sends), this bench's reads excluded;
- Redis commands per second under load: the tier's follow its sync interval and its active
  scopes, LiteLLM's the request rate;
- proxy CPU per request: user + system time of the proxy process and its children (psutil).

    .venv/bin/python bench/proxy.py [--requests 2000] [--concurrency 16] [--keys 1]
        [--rounds 3] [--round-warmup 100] [--interval 0.5] [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from integration.proxy import Keys, Proxy, spawn, write_config  # noqa: E402
from tiered_limiter._server import RedisServer  # noqa: E402

MODES = ("none", "litellm", "tier")
LABELS = {
    "none": "no limits",
    "litellm": "LiteLLM's limiter",
    "tier": "tier",
}


@dataclass
class Mode:
    """One proxy and its own Redis."""

    name: str
    redis: RedisServer
    proxy: Proxy
    keys: list[str]
    samples: dict[str, list[float]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # per command, in the last round

    def add(self, **figures: float) -> None:
        for k, v in figures.items():
            self.samples.setdefault(k, []).append(v)

    def median(self, figure: str) -> float:
        return statistics.median(self.samples[figure])


def redis_counts(client: redis.Redis) -> tuple[int, int, dict[str, int]]:
    """(commands executed, read events, calls per command) so far, not counting INFO itself."""
    commands = client.info("commandstats")
    stats = client.info("stats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in commands.items()}
    calls.pop("info", None)
    return sum(calls.values()), int(stats["total_reads_processed"]), calls


def cpu_seconds(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def rss_bytes(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


async def load(url: str, keys: list[str], requests: int, concurrency: int) -> dict[str, float]:
    """Send `requests` chat completions with `concurrency` in flight; latencies in seconds."""
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
    headers = [{"Authorization": f"Bearer {k}"} for k in keys]
    latencies: list[float] = []
    failures = 0
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:

        async def worker() -> None:
            nonlocal next_index, failures
            while next_index < requests:
                i = next_index
                next_index += 1
                started = time.perf_counter()
                response = await client.post(
                    "/v1/chat/completions", json=body, headers=headers[i % len(headers)]
                )
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started

    latencies.sort()
    return {
        "rps": requests / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "failures": failures,
    }


def start(name: str, root: Path, args: argparse.Namespace) -> Mode:
    """Start one mode's redis-server and proxy (the proxy is not waited on here)."""
    server = RedisServer().start()
    home = root / name
    home.mkdir()
    keys = Keys(home / "keys.json")
    limits = {} if name == "none" else {"rpm_limit": args.rpm}
    if name != "none" and args.tpm:
        limits["tpm_limit"] = args.tpm
    raw = [keys.add(f"sk-bench-{name}-{i}", **limits) for i in range(args.keys)]
    config = write_config(home, server.port)
    env = {"LITELLM_LOG": "ERROR", "TIERED_LIMITER_SYNC_INTERVAL": str(args.interval)}
    env.update(item.split("=", 1) for item in args.env)
    proxy = spawn(home, config, keys, tier=name == "tier", env=env)
    return Mode(name, server, proxy, raw)


def measure(mode: Mode, args: argparse.Namespace) -> None:
    """One round: the proxy is woken first (its key idled through the other modes' rounds,
    and the tier gives an idle key's lease back after 5 s), then measured at steady load."""
    client = mode.redis.client()
    pid = mode.proxy.proc.pid
    wake0, _, _ = redis_counts(client)
    if args.round_warmup:
        asyncio.run(load(mode.proxy.url, mode.keys, args.round_warmup, args.concurrency))
    cmd0, reads0, calls0 = redis_counts(client)
    mode.add(wake_cmds=(cmd0 - wake0) / max(args.round_warmup, 1))
    cpu0 = cpu_seconds(pid)
    figures = asyncio.run(load(mode.proxy.url, mode.keys, args.requests, args.concurrency))
    cpu1 = cpu_seconds(pid)
    cmd1, reads1, calls1 = redis_counts(client)
    client.close()
    mode.calls = {k: v - calls0.get(k, 0) for k, v in calls1.items() if v != calls0.get(k, 0)}
    # The first redis_counts reads twice (two INFO calls) after cmd0/reads0 were taken.
    n = args.requests
    mode.add(
        **figures,
        cmds=(cmd1 - cmd0) / n,
        cmd_s=(cmd1 - cmd0) * figures["rps"] / n,
        trips=(reads1 - reads0 - 2) / n,
        cpu_ms=1000 * (cpu1 - cpu0) / n,
    )


def idle_rate(mode: Mode, seconds: float) -> tuple[float, float]:
    """Redis commands and read events per second the proxy causes with no load."""
    client = mode.redis.client()
    cmd0, reads0, _ = redis_counts(client)
    time.sleep(seconds)  # measuring background traffic over a fixed span
    cmd1, reads1, _ = redis_counts(client)
    client.close()
    return (cmd1 - cmd0) / seconds, (reads1 - reads0 - 2) / seconds


def check_paths(modes: dict[str, Mode]) -> list[str]:
    """What each proxy left in its Redis, to show which limiter counted the requests."""
    lines = []
    for mode in modes.values():
        client = mode.redis.client()
        scope = f"{{api_key:{hashlib.sha256(mode.keys[0].encode()).hexdigest()}}}"
        requests = client.get(f"{scope}:requests")
        tokens = client.get(f"{scope}:tokens")
        lines.append(f"  {mode.name:8} {scope[:20]}...}}: requests={requests} tokens={tokens}")
        client.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--keys", type=int, default=1, help="API keys, each with rpm and tpm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--round-warmup", type=int, default=100, help="requests before each measured round"
    )
    parser.add_argument("--interval", type=float, default=0.5, help="the tier's sync interval")
    parser.add_argument("--rpm", type=int, default=10_000_000)
    parser.add_argument("--tpm", type=int, default=1_000_000_000, help="0: an rpm limit only")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle traffic")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for every proxy (repeatable)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tl-bench-proxy-") as tmp:
        modes: dict[str, Mode] = {}
        try:
            for name in MODES:
                modes[name] = start(name, Path(tmp), args)
            for mode in modes.values():
                mode.proxy.wait_healthy()
            for mode in modes.values():
                warm = asyncio.run(load(mode.proxy.url, mode.keys, args.warmup, args.concurrency))
                if warm["failures"]:
                    raise RuntimeError(f"{mode.name}: {warm['failures']} warm-up requests failed")
            idle = {name: idle_rate(mode, args.idle) for name, mode in modes.items()}
            for r in range(args.rounds):
                for mode in modes.values():
                    measure(mode, args)
                print(
                    f"round {r + 1}/{args.rounds}: "
                    + ", ".join(
                        f"{m.name} {m.samples['rps'][-1]:.0f} req/s" for m in modes.values()
                    ),
                    flush=True,
                )
            rss = {name: rss_bytes(mode.proxy.proc.pid) for name, mode in modes.items()}
            paths = check_paths(modes)
        finally:
            for mode in modes.values():
                mode.proxy.stop()
                mode.redis.stop()

    print(
        f"\n{args.requests} requests x {args.rounds} rounds per mode, concurrency "
        f"{args.concurrency}, {args.keys} key(s), rpm={args.rpm} tpm={args.tpm}, "
        f"tier interval {args.interval} s; medians over rounds"
    )
    header = (
        f"{'mode':28} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'cmds/req':>9} "
        f"{'trips/req':>9} {'cmd/s':>7} {'CPU ms/req':>10} {'fail':>5} {'idle cmd/s':>10} "
        f"{'RSS MB':>7}"
    )
    print(header)
    for name, mode in modes.items():
        print(
            f"{LABELS[name]:28} {mode.median('rps'):7.1f} {mode.median('p50_ms'):7.1f} "
            f"{mode.median('p99_ms'):7.1f} {mode.median('cmds'):9.3f} {mode.median('trips'):9.3f} "
            f"{mode.median('cmd_s'):7.1f} {mode.median('cpu_ms'):10.2f} "
            f"{sum(mode.samples['failures']):5.0f} {idle[name][0]:10.1f} {rss[name] / 2**20:7.0f}"
        )
    none, lite, tier = (modes[m] for m in MODES)
    share = tier.median("rps") / none.median("rps")
    print(
        f"throughput vs no limits: LiteLLM {lite.median('rps') / none.median('rps'):.0%}, "
        f"tier {share:.0%} (target >= 95%: {'met' if share >= 0.95 else 'missed'})"
    )
    tier_cmds = tier.median("cmds")
    ratio = lite.median("cmds") / tier_cmds if tier_cmds else float("inf")
    print(
        f"Redis commands per request, LiteLLM / tier: {ratio:.0f}x "
        f"(target >= 75x: {'met' if ratio >= 75 else 'missed'})"
    )
    print(
        f"Redis commands per request in the {args.round_warmup} requests that wake each round "
        "(not measured above): "
        + ", ".join(f"{m.name} {m.median('wake_cmds'):.3f}" for m in modes.values())
    )
    print("Redis commands per request by name, last round:")
    for mode in modes.values():
        top = sorted(mode.calls.items(), key=lambda kv: -kv[1])
        print(f"  {mode.name:8} " + " ".join(f"{k}={v / args.requests:.3f}" for k, v in top))
    print("Redis counters of the first key after the run:")
    print("\n".join(paths))


if __name__ == "__main__":
    main()
