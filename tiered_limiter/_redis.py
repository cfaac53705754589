"""The cold tier: LiteLLM-compatible keys in Redis and the scripts that move counts there."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

Delta = tuple[str, int, int, int]
"""A pending delta: (scope, window_start, requests, tokens)."""


def _script(name: str) -> str:
    return (
        resources.files(__package__).joinpath("scripts").joinpath(name).read_text(encoding="utf-8")
    )


def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


Command = tuple[str, list[str], list[Any]]
"""A script call: (script name, keys, args)."""


def one_retry() -> Retry:
    """The retry policy of the clients the tier builds: one immediate retry on a broken
    connection, none on a timeout.

    redis-py's default retries a command up to 10 times, with growing pauses, on a broken
    connection and on a timeout. The tier's scripts are not idempotent: a script retried after
    its reply timed out runs twice, and one retried across a Redis restart (a call left
    running after its request stopped waiting) reserves a lease in the new Redis before this
    proxy's heartbeat has noticed the restart, which then drops it without giving it back.
    One retry still replaces a pooled connection that a restart left dead.
    """
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def redact(url: str) -> str:
    """Return `url` with any user name and password removed, fit for logs and exceptions."""
    parts = urlsplit(url)
    # redis-py also takes credentials from the query string (`?password=...`).
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    kept = [(k, v) for k, v in query if k.lower() not in ("password", "username")]
    if parts.username is None and parts.password is None and len(kept) == len(query):
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, urlencode(kept), parts.fragment))


@dataclass(frozen=True, slots=True)
class Totals:
    """One scope's fleet totals as a script returned them; `window_start` 0 means no window.

    The totals include every proxy's outstanding lease; `lease_*` is what the script just
    reserved for this proxy. `restored` says Redis had lost the window (it restarted empty,
    or evicted the key) and the pushed delta restored it: every lease this proxy held there
    is gone with it.
    """

    scope: str
    window_start: int
    requests: int
    tokens: int
    lease_requests: int = 0
    lease_tokens: int = 0
    restored: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """What one script call returned."""

    allowed: bool
    denied_index: int
    redis_now: float
    totals: list[Totals]
    failed: tuple[str, ...] = ()
    """Scopes whose keys hold another type (WRONGTYPE): unchanged, their totals zero."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a heartbeat returned: live proxies, and whether this one was missing from the set
    (Redis lost it, or this proxy was silent past the time to live)."""

    proxies: int
    rejoined: bool


@dataclass(frozen=True, slots=True)
class Call:
    """One scope's part of a script call: limits, the lease wanted, the delta pushed with it."""

    scope: str
    rpm: int = 0
    tpm: int = 0
    want_requests: int = 0
    want_tokens: int = 0
    window_start: int = 0
    requests: int = 0
    tokens: int = 0


class RedisBackend:
    """Runs the tier's scripts against one Redis, a Sentinel-managed one, or a Cluster.

    Args:
        client: A `redis.asyncio.Redis` or `RedisCluster` client.
        namespace: A prefix of every key, as LiteLLM's `RedisCache(namespace=...)` uses.
        window: The window length in seconds.
        clock: When given, the time passed to every script instead of Redis `TIME`, so every
            process that shares the clock agrees on windows (tests use this).
    """

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        namespace: str,
        window: int,
        clock: Callable[[], float] | None,
    ) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self._prefix = f"{namespace}:" if namespace else ""
        self._window = window
        self._clock = clock
        self._sources = {"limiter": _script("limiter.lua"), "heartbeat": _script("heartbeat.lua")}
        self._shas = {name: _sha1(source) for name, source in self._sources.items()}
        self._proxies_key = f"{self._prefix}{{tiered_limiter:proxies}}"
        self.proxies = 1
        """Live proxies, which share what remains of each limit when leases are granted."""
        self.round_trips = 0
        self.commands = 0

    def keys(self, scope: str) -> list[str]:
        """Return LiteLLM v3's keys of `scope`: window start, requests and tokens."""
        base = f"{self._prefix}{{{scope}}}:"
        return [base + "window", base + "requests", base + "tokens"]

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    def _groups(self, calls: Sequence[Call], batch_size: int) -> list[list[Call]]:
        """Split `calls` into script batches; on a Cluster, each batch stays in one slot."""
        if not self.cluster:
            return [list(calls[i : i + batch_size]) for i in range(0, len(calls), batch_size)]

        by_slot: dict[int, list[Call]] = {}
        for call in calls:
            slot = self.client.keyslot(self.keys(call.scope)[0])  # type: ignore[union-attr]
            by_slot.setdefault(slot, []).append(call)
        groups: list[list[Call]] = []
        for members in by_slot.values():
            groups.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
        return groups

    def _args(
        self, calls: Sequence[Call], *, check: bool, tokens: int, requests: int = 1
    ) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        # The script's mode: 0 sync, 1 check counting one request, 2 check of tokens alone.
        mode = (1 if requests else 2) if check else 0
        args: list[Any] = [self._window, self._now_arg(), mode, tokens, self.proxies]
        for call in calls:
            keys.extend(self.keys(call.scope))
            args.extend(
                (
                    call.rpm,
                    call.tpm,
                    call.want_requests,
                    call.want_tokens,
                    call.window_start,
                    call.requests,
                    call.tokens,
                )
            )
        return keys, args

    @staticmethod
    def _parse(calls: Sequence[Call], raw: Sequence[Any]) -> Reply:
        values = [int(v) for v in raw]
        per_scope = [values[4 + 6 * i : 10 + 6 * i] for i in range(len(calls))]
        totals = [
            Totals(call.scope, max(0, ws), requests, tokens, lease_req, lease_tok, bool(lost))
            for call, (ws, requests, tokens, lease_req, lease_tok, lost) in zip(
                calls, per_scope, strict=True
            )
        ]
        failed = tuple(call.scope for call, v in zip(calls, per_scope, strict=True) if v[0] < 0)
        now = values[2] + values[3] / 1e6
        return Reply(bool(values[0]), values[1] - 1, now, totals, failed)

    async def _run(self, commands: list[Command]) -> list[Any]:
        """Run script calls in one pipeline, loading scripts a restarted Redis forgot.

        Scripts are sent by hash alone: redis-py's pipeline would ask SCRIPT EXISTS first on
        every execute, one more round trip per sync.
        """
        results = await self._pipeline(commands)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for name, source in self._sources.items():
                self._shas[name] = await self.client.script_load(source)
            retried = await self._pipeline([commands[i] for i in missing])
            for i, result in zip(missing, retried, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        if self.cluster:
            # redis-py's cluster pipeline refuses EVALSHA; concurrent calls reach each slot's
            # node in parallel instead, one request per batch.
            calls = [self.client.evalsha(self._shas[n], len(k), *k, *a) for n, k, a in commands]
            gathered: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
            self.round_trips += len(commands)
            self.commands += len(commands)
            return gathered

        async with self.client.pipeline(transaction=False) as pipe:
            for name, keys, args in commands:
                pipe.evalsha(self._shas[name], len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        self.round_trips += 1
        self.commands += len(commands)
        return results

    async def sync(
        self,
        calls: Sequence[Call],
        *,
        batch_size: int,
        proxy_id: str,
        heartbeat_ttl: float,
        beat: bool = True,
        prune: bool = True,
        leaving: bool = False,
    ) -> tuple[list[Reply], Heartbeat | None]:
        """Push deltas and, with `beat`, beat the heart, in one round trip.

        `prune` also drops proxies silent past `heartbeat_ttl` and renews the set's TTL: a beat
        without it costs two commands fewer.

        Returns:
            The replies of every batch, and what the heartbeat said (None without one).
        """
        groups = self._groups(calls, batch_size)
        commands: list[Command] = [
            ("limiter", *self._args(g, check=False, tokens=0)) for g in groups
        ]
        if beat or leaving:
            commands.append(
                (
                    "heartbeat",
                    [self._proxies_key],
                    [
                        proxy_id,
                        self._now_arg(),
                        heartbeat_ttl,
                        1 if leaving else 0,
                        1 if prune or leaving else 0,
                    ],
                )
            )
        results = await self._run(commands)
        replies = [self._parse(group, raw) for group, raw in zip(groups, results, strict=False)]
        if len(results) == len(groups):
            return replies, None
        live, rejoined = (int(v) for v in results[-1])
        return replies, Heartbeat(live, bool(rejoined))

    async def read(self, calls: Sequence[Call], *, batch_size: int) -> list[Reply]:
        """Read cold scopes and lease them, opening a window where none is open, in one trip."""
        groups = self._groups(calls, batch_size)
        results = await self._run(
            [("limiter", *self._args(g, check=False, tokens=0)) for g in groups]
        )
        return [self._parse(group, raw) for group, raw in zip(groups, results, strict=True)]

    async def acquire(self, calls: Sequence[Call], tokens: int, requests: int = 1) -> Reply:
        """Check and charge one request atomically against every scope in `calls`; with
        `requests=0`, its tokens alone.

        On a Cluster, scopes in different slots cannot share one script: each slot is checked
        in turn and the slots already charged are refunded when a later one denies.
        """
        groups = self._groups(calls, len(calls)) if self.cluster else [list(calls)]
        charged: list[Reply] = []
        for group in groups:
            args = self._args(group, check=True, tokens=tokens, requests=requests)
            (raw,) = await self._run([("limiter", *args)])
            reply = self._parse(group, raw)
            if not reply.allowed:
                await self._refund(charged, tokens, requests)
                offset = sum(len(r.totals) for r in charged)
                index = offset + reply.denied_index if reply.denied_index >= 0 else -1
                return Reply(False, index, reply.redis_now, reply.totals, reply.failed)
            charged.append(reply)

        totals = [t for reply in charged for t in reply.totals]
        return Reply(True, -1, charged[-1].redis_now, totals)

    async def _refund(self, charged: list[Reply], tokens: int, requests: int) -> None:
        refunds = [
            Call(
                t.scope,
                window_start=t.window_start,
                requests=-requests - t.lease_requests,
                tokens=-tokens - t.lease_tokens,
            )
            for reply in charged
            for t in reply.totals
        ]
        if refunds:
            groups = self._groups(refunds, len(refunds))
            await self._run([("limiter", *self._args(g, check=False, tokens=0)) for g in groups])

    async def ping(self, timeout: float) -> None:
        """Raise if Redis does not answer a PING within `timeout` seconds."""
        await asyncio.wait_for(self.client.ping(), timeout)  # type: ignore[arg-type, unused-ignore]
        self.round_trips += 1
        self.commands += 1


def local_midpoint(started: float) -> float:
    """The local wall-clock time halfway through a round trip that began at `started`."""
    return (started + time.time()) / 2
