"""Load through a fleet: a bounded number of requests at a fixed rate, and what was admitted.

`drive` sends `count` chat completions at `rate` per second over the given API keys (each at
its scheduled time, without waiting for earlier answers) and records every answer: status,
send and answer time, the proxy nginx chose (`X-Fleet-Upstream`) and the remaining requests
LiteLLM reported. `RedisWatch` samples each key's window start and request count in Redis while
the load runs. `windows` splits the answers into the limiter's windows.

    python -m integration.load --fleet /tmp/fleet --rpm 60 --rate 9 --seconds 30

creates a fresh key limited to 60 requests per window in the fleet's keys file, sends 9
requests a second for 30 s and prints the count admitted per window and per proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp
import redis.asyncio as aioredis

from .proxy import Keys, hashed

REMAINING_HEADER = "x-ratelimit-api_key-remaining-requests"
UPSTREAM_HEADER = "x-fleet-upstream"


@dataclass(frozen=True, slots=True)
class Answer:
    """One request and its answer; times are wall-clock seconds (the clock Redis uses here).

    Attributes:
        key: The raw API key it was sent with.
        sent: When it was sent.
        done: When its answer arrived (`sent` if it failed without one).
        status: The HTTP status; 0 when the connection failed.
        upstream: The proxy (`host:port`) nginx sent it to, "" when unknown.
        remaining: The remaining requests LiteLLM reported for the key, when it did.
    """

    key: str
    sent: float
    done: float
    status: int
    upstream: str
    remaining: int | None

    @property
    def admitted(self) -> bool:
        return self.status == 200


async def _one(session: aiohttp.ClientSession, url: str, key: str) -> Answer:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
    sent = time.time()
    try:
        async with session.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            await response.read()
            remaining = response.headers.get(REMAINING_HEADER)
            return Answer(
                key,
                sent,
                time.time(),
                response.status,
                response.headers.get(UPSTREAM_HEADER, ""),
                int(remaining) if remaining is not None and remaining.isdigit() else None,
            )
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return Answer(key, sent, time.time(), 0, "", None)


async def drive(
    url: str,
    keys: Sequence[str],
    *,
    rate: float,
    count: int,
    timeout: float = 30.0,
    concurrency: int = 256,
) -> list[Answer]:
    """Send `count` requests at `rate` per second, cycling through `keys`; return every answer.

    Requests start on schedule whether or not earlier ones were answered, up to `concurrency`
    in flight (past that, sends wait and the answers' `sent` times show the lag).
    """
    if rate <= 0 or count < 0 or not keys:
        raise ValueError(f"need rate > 0, count >= 0 and at least one key, got {rate}, {count}")
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def gated(session: aiohttp.ClientSession, key: str) -> Answer:
        async with gate:
            return await _one(session, url, key)

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        started = time.monotonic()
        tasks = []
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule: request i goes out at i / rate
            tasks.append(asyncio.create_task(gated(session, keys[i % len(keys)])))
        return list(await asyncio.gather(*tasks))


@dataclass
class RedisWatch:
    """Samples `{api_key:<hash>}:window` and `:requests` of each key while load runs.

    Use as `async with RedisWatch(url, keys) as watch:`; afterwards `starts(key)` lists the
    window starts Redis held and `held(key)` the highest request count it held in each.
    """

    url: str
    keys: Sequence[str]
    every: float = 0.05
    samples: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _client: aioredis.Redis | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> RedisWatch:
        self._client = aioredis.Redis.from_url(
            self.url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self.samples = {key: [] for key in self.keys}
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            # Let the poller finish its sample rather than cancel it: redis-py can hang in the
            # cleanup of a command cancelled mid-reply, and every sample is bounded anyway.
            self._stop.set()
            await self._task
        await self.sample()  # what Redis holds once the load has stopped
        if self._client is not None:
            await self._client.aclose()

    async def _poll(self) -> None:
        while not self._stop.is_set():
            await self.sample()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)  # the sampling period

    async def sample(self) -> None:
        assert self._client is not None
        names = []
        for key in self.keys:
            scope = f"{{api_key:{hashed(key)}}}"
            names += [f"{scope}:window", f"{scope}:requests"]
        values = await self._client.mget(names)
        now = time.time()
        for i, key in enumerate(self.keys):
            window, requests = values[2 * i], values[2 * i + 1]
            if window is not None:
                self.samples[key].append((now, int(window), int(float(requests or 0))))

    def starts(self, key: str) -> list[int]:
        return sorted({window for _, window, _ in self.samples.get(key, [])})

    def held(self, key: str) -> dict[int, int]:
        top: dict[int, int] = {}
        for _, window, requests in self.samples.get(key, []):
            top[window] = max(top.get(window, 0), requests)
        return top


@dataclass(frozen=True, slots=True)
class Window:
    """One window of one key, as the fleet answered it.

    Attributes:
        start: Its start (whole seconds, as LiteLLM and the tier store it).
        offered: Requests sent in it.
        admitted: Requests admitted in it.
        by_upstream: Admitted requests per proxy (`host:port`).
        complete: Whether load was offered over the whole window.
    """

    start: int
    offered: int
    admitted: int
    by_upstream: Mapping[str, int]
    complete: bool

    def utilization(self, limit: int) -> float:
        """The share of what could have been admitted, min(offered, limit), that was; an
        overshoot counts as 100%, not more (overshoot is measured on its own)."""
        possible = min(self.offered, limit)
        return 1.0 if possible == 0 else min(self.admitted, possible) / possible


def reconstruct_starts(answers: Iterable[Answer], window: int) -> list[int]:
    """Window starts implied by admissions alone: each opens at the first admission after the
    previous one ended, at its whole second (for fleets where Redis holds no window)."""
    starts: list[int] = []
    for answer in sorted((a for a in answers if a.admitted), key=lambda a: a.sent):
        if not starts or answer.sent >= starts[-1] + window:
            starts.append(math.floor(answer.sent))
    return starts


def assign(
    answers: Sequence[Answer], *, window: int, limit: int, starts: Sequence[int] | None = None
) -> tuple[list[int], list[tuple[Answer, int]]]:
    """Place each of one key's answers in a window; returns the window starts and the pairs.

    Args:
        answers: One key's answers.
        window: The window length in seconds.
        limit: The key's limit per window.
        starts: Window starts as Redis held them; reconstructed from admissions when None.

    A request is in the window open when it was sent. One sent before a window opened but
    answered after (in flight across the boundary) is placed by the count LiteLLM reported for
    it: a count below half of what its proxy had admitted in the old window means the new one.
    """
    if not answers:
        return [], []
    opened = sorted(starts) if starts else reconstruct_starts(answers, window)
    if not opened:
        opened = [math.floor(min(a.sent for a in answers))]
    per_proxy: list[Counter[str]] = [Counter() for _ in opened]
    placed = []
    for answer in sorted(answers, key=lambda a: a.sent):
        i = max(0, bisect.bisect_right(opened, answer.sent) - 1)
        if (
            answer.admitted
            and i + 1 < len(opened)
            and answer.done >= opened[i + 1]
            and answer.remaining is not None
            and limit - answer.remaining < per_proxy[i][answer.upstream] / 2
        ):
            i += 1
        if answer.admitted:
            per_proxy[i][answer.upstream] += 1
        placed.append((answer, i))
    return opened, placed


def windows(
    answers: Sequence[Answer], *, window: int, limit: int, starts: Sequence[int] | None = None
) -> list[Window]:
    """Split one key's answers into its windows (placed as `assign` places them)."""
    opened, placed = assign(answers, window=window, limit=limit, starts=starts)
    if not opened:
        return []
    offered = [0] * len(opened)
    admitted = [0] * len(opened)
    per_proxy: list[Counter[str]] = [Counter() for _ in opened]
    for answer, i in placed:
        offered[i] += 1
        if answer.admitted:
            admitted[i] += 1
            per_proxy[i][answer.upstream] += 1
    first = min(a.sent for a in answers)
    last = max(a.sent for a in answers)
    return [
        Window(
            start,
            offered[i],
            admitted[i],
            dict(per_proxy[i]),
            complete=start >= math.floor(first) and start + window <= last,
        )
        for i, start in enumerate(opened)
    ]


def by_key(answers: Iterable[Answer]) -> dict[str, list[Answer]]:
    grouped: dict[str, list[Answer]] = {}
    for answer in answers:
        grouped.setdefault(answer.key, []).append(answer)
    return grouped


# The command line


async def _main(args: argparse.Namespace) -> int:
    state = json.loads((args.fleet / "fleet.json").read_text())
    url = args.url or state["doors"][0]["url"]
    keys = Keys(Path(state["keys_file"]))
    keys.keys = json.loads(keys.path.read_text())
    names = args.key or []
    for _ in range(args.new_keys if not names else 0):
        names.append(keys.add(f"sk-load-{secrets.token_hex(6)}", rpm_limit=args.rpm))
    count = round(args.rate * args.seconds)
    redis_url = state.get("redis_url")
    if redis_url:
        async with RedisWatch(redis_url, names) as watch:
            answers = await drive(url, names, rate=args.rate, count=count)
    else:
        watch = None
        answers = await drive(url, names, rate=args.rate, count=count)
    statuses = Counter(a.status for a in answers)
    print(f"sent {len(answers)} to {url}: " + ", ".join(f"{s}: {n}" for s, n in statuses.items()))
    for key, mine in by_key(answers).items():
        starts = watch.starts(key) if watch else None
        held = watch.held(key) if watch else {}
        limit = int(keys.keys.get(key, {}).get("rpm_limit", args.rpm))
        print(f"key {key[:14]}... limit {limit} per {state['window']} s window")
        for w in windows(mine, window=state["window"], limit=limit, starts=starts):
            proxies = ", ".join(f"{u}: {n}" for u, n in sorted(w.by_upstream.items()))
            redis_held = held.get(w.start, "-")
            print(
                f"  window {w.start}: offered {w.offered}, admitted {w.admitted}"
                f" (Redis held {redis_held}){'' if w.complete else ' partial'}; {proxies}"
            )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.load", description=__doc__)
    parser.add_argument(
        "--fleet",
        type=Path,
        default=os.environ.get("FLEET_DIR"),
        help="the fleet's --dir (default: $FLEET_DIR, set by `fleet run`)",
    )
    parser.add_argument("--url", help="where to send (default: the fleet's first door)")
    parser.add_argument("--key", action="append", help="an API key already in the keys file")
    parser.add_argument("--new-keys", type=int, default=1, help="fresh keys to create (1)")
    parser.add_argument("--rpm", type=int, default=60, help="their limit per window (60)")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second (10)")
    parser.add_argument("--seconds", type=float, default=30.0, help="for how long (30)")
    args = parser.parse_args(argv)
    if args.fleet is None:
        parser.error("--fleet is required outside `python -m integration.fleet run`")
    if args.rate * args.seconds > 100_000:
        parser.error("at most 100000 requests per run")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
