"""The public limiter: a Rust hot tier in front of Redis, kept in step by a sync task."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from . import _native, _validate
from ._errors import InvalidArgumentError, InvalidTypeError, RedisUnavailableError
from ._redis import Call, Delta, Heartbeat, RedisBackend, Reply, one_retry, redact

logger = logging.getLogger(__name__)

_ADMITTED = _native.ADMITTED
_DENIED = _native.DENIED
_LOAD = _native.LOAD
_EXACT = _native.EXACT
_POLICIES = ("local", "allow", "deny")
# Each scope in a sync batch costs three keys and five arguments in one script call; 500 keeps
# a call well under a millisecond of Redis time.
_DEFAULT_BATCH = 500
_EVICT_BUDGET = 4096
# Requests' worth of lease a cold scope or an exact check asks for; the share cap (what remains
# / proxies) keeps it small near a limit.
_FIRST_LEASE = 4
# How often a heartbeat also prunes proxies gone silent: the live-proxy count is this fresh,
# well inside the heartbeat's time to live (2 s or more).
_PRUNE_SECONDS = 0.5
# Rounds of the slow path: loads, and waits on exact checks in flight, before its own.
_SLOW_ROUNDS = 8
# Batches per sync round trip: about 2,000 scopes, some 70 ms of work on a small machine.
_SYNC_BATCHES = 4


class Decision(NamedTuple):
    """The answer to one request.

    Attributes:
        allowed: Whether the request may proceed. A denied request charged nothing.
        remaining: Requests left in the tightest request limit, None when no scope has one.
        retry_after: Seconds until the denying scope's window ends; 0 when allowed.
        remaining_tokens: Tokens left in the tightest token limit, None when no scope has one.
        scope: The scope that denied the request, None when allowed.
    """

    allowed: bool
    remaining: int | None
    retry_after: float
    remaining_tokens: int | None = None
    scope: str | None = None


@dataclass(slots=True)
class _LateExact:
    """What an exact check that outlasted its request needs to apply its reply later."""

    taken: list[tuple[int, int, int] | None]
    scopes: list[str]
    tokens: int
    requests: int
    uncounted: bool = False
    """The policy admitted the request without charging it anywhere ("allow")."""


@dataclass(frozen=True, slots=True)
class Limit:
    """One scope of a request with its limits; None means no limit of that kind."""

    scope: str
    rpm: int | None = None
    tpm: int | None = None


_Errors = (RedisError, OSError, asyncio.TimeoutError)


class _NoAnswerError(Exception):
    """`start` gave up on Redis after `attempts` PINGs; the last error is the cause."""

    def __init__(self, attempts: int) -> None:
        super().__init__(attempts)
        self.attempts = attempts


_T = TypeVar("_T")
# Seconds between PINGs while `start` waits for Redis.
_START_RETRY = 0.05
# The longest one PING of `start` waits (unless `redis_timeout` is longer): a connection that
# was accepted but never answers is dropped and a new one tried, not waited on to the end.
_START_ATTEMPT = 1.0
# The error code Redis gives a command on a key of another type; the script reports it per scope.
_WRONGTYPE = "WRONGTYPE"


class _ScopesFailedError(Exception):
    """Redis answered, but some scopes' keys hold another type, so it could not count them."""


class TieredLimiter:
    """Requests- and tokens-per-window limits, checked in process and shared through Redis.

    Use it as `async with TieredLimiter(...) as limiter:`; leaving the block flushes every
    pending delta to Redis.

    Args:
        redis: A Redis URL, a `redis.asyncio.Redis` or `RedisCluster` client, or None for one
            process without Redis (exact within the process).
        sync_interval: Seconds between pushes of local deltas to Redis, at least 0.001 and
            shorter than `window`. Every duration here is at most a day (86,400 s).
        window: The window length in seconds, as LiteLLM's `LITELLM_RATE_LIMIT_WINDOW_SIZE`.
        max_scopes: The most scopes tracked in memory; past it, idle synced scopes are evicted.
        namespace: A prefix of every Redis key (LiteLLM's `RedisCache(namespace=...)`).
        redis_timeout: The longest a request waits on Redis (a cold scope or the exact last
            stretch before a limit). A call that outlasts it is not abandoned: the request
            is answered by `on_redis_down`, and a late reply is still applied, so that the
            lease it brings is not lost and what it counted is not counted twice.
        sync_timeout: The longest a sync waits for Redis's reply, at least `sync_interval`.
            No request waits on a sync (once one is an interval late, requests that need
            Redis take the policy); a sync given up after Redis ran it would count its charges
            again and lose the leases it was granted until their window ends.
        connect_timeout: The longest `start` waits for Redis's first answer. Longer than
            `redis_timeout` by default: no request waits on it, and a process starting beside
            a busy Redis (or a slow TLS handshake) should not fail for a few hundred ms.
        on_redis_down: What requests that need Redis get while it is unreachable: "local"
            (this proxy's share of the limit, from local state), "allow" or "deny".
        batch_size: Scopes per script call in a sync.
        clock: A function returning the fleet's time in seconds; by default Redis's clock,
            estimated from its replies. Tests inject one to roll windows over without waiting.
        proxy_id: This process's name in the fleet's heartbeat set.
        shards: Independently locked parts of the in-memory table (a power of two).
        idle_release: Seconds a scope may go unused and keep the small lease that lets its
            next request skip Redis; after that, the lease goes back to the fleet.
        lease_horizon: Seconds of a scope's use a lease may cover (capped, beyond two
            intervals, at a sixteenth of the limit). A busy scope is synced when its lease
            runs low and at least once per horizon, not every interval: Redis traffic then
            follows active scopes over the horizon. A sync_interval or shorter syncs every
            scope used in an interval, at its end.

    Raises:
        InvalidArgumentError: An argument has an unusable value (the message names it).
        InvalidTypeError: An argument has an unusable type.
    """

    def __init__(
        self,
        redis: str | Redis | RedisCluster | None,
        *,
        sync_interval: float = 0.1,
        window: int = 60,
        max_scopes: int = 1_000_000,
        namespace: str = "",
        redis_timeout: float = 0.25,
        connect_timeout: float = 5.0,
        sync_timeout: float = 2.0,
        on_redis_down: str = "local",
        batch_size: int = _DEFAULT_BATCH,
        clock: Callable[[], float] | None = None,
        proxy_id: str | None = None,
        shards: int = 64,
        idle_release: float = 5.0,
        lease_horizon: float = 10.0,
    ) -> None:
        self._window = _validate.positive_int(window, "window", maximum=86_400 * 366)
        self._interval = _validate.positive_seconds(
            sync_interval, "sync_interval", minimum=_validate.MIN_INTERVAL
        )
        if self._interval >= self._window:
            raise InvalidArgumentError(
                f"sync_interval must be shorter than window ({self._window} s), got {sync_interval}"
            )
        self._timeout = _validate.positive_seconds(redis_timeout, "redis_timeout")
        self._connect_timeout = _validate.positive_seconds(connect_timeout, "connect_timeout")
        self._sync_timeout = max(
            _validate.positive_seconds(sync_timeout, "sync_timeout"), self._interval
        )
        idle = _validate.positive_seconds(idle_release, "idle_release")
        self._idle_drains = max(1, math.ceil(idle / self._interval))
        horizon = _validate.positive_seconds(lease_horizon, "lease_horizon")
        self._lease_drains = max(1, round(min(horizon, self._window) / self._interval))
        self._policy = _validate.choice(on_redis_down, "on_redis_down", _POLICIES)
        self._batch = _validate.positive_int(batch_size, "batch_size", maximum=100_000)
        _validate.positive_int(max_scopes, "max_scopes", maximum=2**31)
        if not isinstance(namespace, str):
            raise InvalidTypeError(f"namespace must be a str, got {type(namespace).__name__}")
        if clock is not None and not callable(clock):
            raise InvalidTypeError(f"clock must be callable, got {type(clock).__name__}")
        _validate.positive_int(shards, "shards", maximum=1024)
        if shards & (shards - 1):
            raise InvalidArgumentError(f"shards must be a power of two, got {shards}")
        self._table = _native.Table(max_scopes, shards, Decision)
        self._clock = clock
        self._offset = 0.0
        self._proxy_id = proxy_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._namespace = namespace
        self._redis_arg = redis
        self._backend: RedisBackend | None = None
        self._owns_client = False
        self._url = "<client>"
        if redis is not None and not isinstance(redis, (str, Redis, RedisCluster)):
            raise InvalidTypeError(
                "redis must be a URL, a redis.asyncio.Redis or RedisCluster client, or None; "
                f"got {type(redis).__name__}"
            )
        self._proxies = 1
        self._degraded = False
        # Whether the sync round trip in flight is overdue: then Redis is slow, and requests
        # stop waiting on it (`_redis_slow`).
        self._sync_watch = _Overdue(self._interval)
        # Every sync beats the heart, so a Redis that lost this proxy's leases is noticed in
        # the same round trip as the leases granted since (`_heard`); one beat in
        # `_prune_every` (about twice a second) also prunes silent proxies.
        self._prune_every = max(1, math.ceil(_PRUNE_SECONDS / self._interval))
        self._since_prune = 0
        self._beaten = False
        self._error_kinds: set[str] = set()
        self._loading: dict[str, asyncio.Future[None]] = {}
        # Exact checks in flight, by scope: a request that would go exact on a scope already
        # being checked waits for that reply (and the lease it brings) and checks again.
        self._exacting: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Calls left running after their request stopped waiting; their replies still apply.
        self._late: set[asyncio.Future[Any]] = set()
        self._sync_lock = asyncio.Lock()
        self._counts = {
            "syncs": 0,
            "scopes_synced": 0,
            "redis_errors": 0,
            "loads": 0,
            "exact_checks": 0,
            "fallback_decisions": 0,
            "dropped_deltas": 0,
            "dropped_corrections": 0,
            "redis_resets": 0,
            "late_replies": 0,
        }

    # Lifecycle

    async def __aenter__(self) -> TieredLimiter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect to Redis and start the sync task.

        Raises:
            RedisUnavailableError: Redis did not answer within `connect_timeout`, or refused
                the user or password (at once).
        """
        if self._task is not None or self._redis_arg is None:
            return

        client = self._redis_arg
        if isinstance(client, str):
            self._url = redact(client)
            # Requests and syncs give up waiting at their own timeouts; the socket lets a
            # reply come later than either (it is applied then), within twice `sync_timeout`.
            client = Redis.from_url(
                client,
                socket_timeout=max(self._timeout, 2 * self._sync_timeout),
                socket_connect_timeout=self._timeout,
                retry=one_retry(),
            )
            self._owns_client = True
        backend = RedisBackend(
            client, namespace=self._namespace, window=self._window, clock=self._clock
        )
        try:
            await self._first_ping(backend)
        except (_NoAnswerError, *_Errors) as exc:
            if self._owns_client:
                await client.aclose()
            last = exc.__cause__ if isinstance(exc, _NoAnswerError) else exc
            if isinstance(last, AuthenticationError):
                # Reached, and refused: waiting longer would not help.
                raise RedisUnavailableError(
                    f"Redis at {self._url} refused this client's user or password: "
                    f"{type(last).__name__}"
                ) from None
            tries = f" ({exc.attempts} PINGs)" if isinstance(exc, _NoAnswerError) else ""
            raise RedisUnavailableError(
                f"could not reach Redis at {self._url} within "
                f"connect_timeout={self._connect_timeout} s{tries}: "
                f"{type(last).__name__}"
            ) from None
        self._backend = backend
        await self._sync_once()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="tiered_limiter.sync")
        self._task.add_done_callback(_log_crash)

    async def _first_ping(self, backend: RedisBackend) -> None:
        """PING until Redis answers, for at most `connect_timeout`; if it never does, raise
        `_NoAnswerError` with the count of PINGs and the last error as its cause.

        A refused, failed or unanswered PING is tried again (Redis may be starting beside this
        process, or one answer may miss its time on a busy host), each on its own deadline so
        that one stuck connection does not use up the whole wait; a refused password is not
        tried again.
        """
        deadline = time.monotonic() + self._connect_timeout
        per_ping = max(self._timeout, _START_ATTEMPT)
        attempts = 0
        while True:
            left = deadline - time.monotonic()
            attempts += 1
            try:
                await backend.ping(max(min(left, per_ping), 0.001))
                return
            except AuthenticationError:
                raise
            except (RedisConnectionError, TimeoutError, asyncio.TimeoutError, OSError) as exc:
                if time.monotonic() + _START_RETRY >= deadline:
                    raise _NoAnswerError(attempts) from exc
            await asyncio.sleep(_START_RETRY)  # a pause between attempts, not a wait on state

    async def close(self) -> None:
        """Stop the sync task and flush every pending delta to Redis."""
        task, self._task = self._task, None
        self._stopping = True
        if task is not None:
            task.cancel()
            # Not `await task`: that would also swallow a cancellation of `close` itself.
            await asyncio.wait({task})
        backend = self._backend
        if backend is None:
            return

        if self._late:
            # Replies still on their way bring leases: let them land, so that this last sync
            # gives them back.
            await asyncio.wait(set(self._late), timeout=self._sync_timeout)
        await self._sync_once(leaving=True)
        if self._degraded:
            lost = self._table.stats()["pending"]
            logger.warning("stopped with %d scopes' deltas not pushed: Redis unreachable", lost)
        if self._owns_client:
            await backend.client.aclose()
        self._backend = None

    # The request path

    def try_acquire(
        self,
        scope: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        tokens: int = 0,
        requests: int = 1,
    ) -> Decision | None:
        """Check and charge one request from local state alone, without awaiting.

        `requests=0` charges the token estimate alone, checked against `tpm`: a token
        reservation for a request that an earlier check already counted.

        Returns:
            The decision, or None where only Redis can answer: a scope not yet read from
            Redis, or the last stretch before a limit. Then call `acquire`.
        """
        # The hot path: one native call validates, checks and builds the Decision.
        clock = self._clock
        now = clock() if clock is not None else time.time() + self._offset
        try:
            decision: Decision | None = self._table.decide_one(
                scope,
                rpm,
                tpm,
                tokens,
                now,
                self._window,
                self._proxies,
                self._backend is None,
                requests,
            )
        except (TypeError, ValueError, OverflowError):
            # Raise the limiter's own error for the argument, as the slow paths do.
            _validate_one(scope, rpm, tpm, tokens, requests)
            raise
        if decision is None and (self._degraded or self._redis_slow()):
            r, t = _validate.limit(rpm, "rpm"), _validate.limit(tpm, "tpm")
            return self._fallback([scope], [r], [t], tokens, requests)
        return decision

    async def acquire(
        self,
        scope: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        tokens: int = 0,
        requests: int = 1,
    ) -> Decision:
        """Check and charge one request: one scope, its limits and a token estimate.

        Waits on Redis only for a cold scope or the last stretch before a limit, and then at
        most `redis_timeout`.
        """
        decision = self.try_acquire(scope, rpm=rpm, tpm=tpm, tokens=tokens, requests=requests)
        if decision is not None:
            return decision
        return await self._acquire_slow(
            [scope], [_validate.limit(rpm, "rpm")], [_validate.limit(tpm, "tpm")], tokens, requests
        )

    def try_acquire_many(
        self, limits: Sequence[Limit], *, tokens: int = 0, requests: int = 1
    ) -> Decision | None:
        """`try_acquire` over several scopes: all are charged or none."""
        scopes, rpms, tpms = _unpack(limits)
        n = _validate.tokens(tokens)
        counted = _validate.requests(requests)
        result = self._table.check(
            scopes,
            rpms,
            tpms,
            n,
            self._now(),
            self._window,
            self._proxies,
            offline=self._offline,
            requests=counted,
        )
        if result[0] > _DENIED:
            slow = self._degraded or self._redis_slow()
            return self._fallback(scopes, rpms, tpms, n, counted) if slow else None
        return _decision(result, scopes)

    async def acquire_many(
        self, limits: Sequence[Limit], *, tokens: int = 0, requests: int = 1
    ) -> Decision:
        """`acquire` over several scopes (key, user, team, model): all are charged or none."""
        decision = self.try_acquire_many(limits, tokens=tokens, requests=requests)
        if decision is not None:
            return decision
        scopes, rpms, tpms = _unpack(limits)
        return await self._acquire_slow(scopes, rpms, tpms, tokens, requests)

    def record(self, scope: str, *, tokens: int) -> None:
        """Correct a scope's token charge after the call: actual minus estimate, signed."""
        scope = _validate.scope(scope)
        n = _validate.tokens(tokens, signed=True)
        if n and not self._table.record(scope, n, self._now(), self._window):
            # The scope is not tracked (its window ended, or the table is full of unsynced
            # scopes); a correction to an ended window must not reach the next one.
            self._counts["dropped_corrections"] += 1

    async def sync(self) -> None:
        """Push pending deltas and read the fleet totals back now, without waiting for the task."""
        await self._sync_once()

    def stats(self) -> dict[str, Any]:
        """Counters for dashboards; names no scope, key or password."""
        table = self._table.stats()
        backend = self._backend
        return {
            **table,
            **self._counts,
            "redis_round_trips": backend.round_trips if backend else 0,
            "redis_commands": backend.commands if backend else 0,
            "degraded": self._degraded or self._redis_slow(),
            "proxies": self._proxies,
        }

    # Internals

    @property
    def _offline(self) -> bool:
        return self._backend is None

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return time.time() + self._offset

    async def _acquire_slow(
        self, scopes: list[str], rpms: list[int], tpms: list[int], tokens: int, requests: int
    ) -> Decision:
        """Answer a request that needs Redis: read cold scopes, then check exactly if needed.

        Everything it waits for, together, takes at most `redis_timeout`.
        """
        backend = self._backend
        deadline = time.monotonic() + self._timeout
        for _ in range(_SLOW_ROUNDS):
            result = self._table.check(
                scopes,
                rpms,
                tpms,
                tokens,
                self._now(),
                self._window,
                self._proxies,
                requests=requests,
            )
            if result[0] <= _DENIED:
                return _decision(result, scopes)
            if self._degraded or backend is None or self._redis_slow():
                return self._fallback(scopes, rpms, tpms, tokens, requests)
            if result[0] != _LOAD:
                in_flight = {self._exacting[s] for s in scopes if s in self._exacting}
                if not in_flight:
                    break
                # Share the exact check in flight: its reply brings a lease that may cover
                # this request too (a burst on a scope takes one exact check per lease).
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait(in_flight, timeout=max(left, 0.0))
                if len(done) < len(in_flight):
                    return self._fallback(scopes, rpms, tpms, tokens, requests)
                continue
            try:
                await self._load(backend, scopes, rpms, tpms, tokens, deadline)
            except _ScopesFailedError:
                break  # answered by the policy, below
            except _Errors as exc:
                self._redis_failed(exc)
                break

        if backend is None or result[0] != _EXACT:
            return self._fallback(scopes, rpms, tpms, tokens, requests)
        return await self._exact(backend, scopes, rpms, tpms, tokens, requests, deadline)

    async def _load(
        self,
        backend: RedisBackend,
        scopes: list[str],
        rpms: list[int],
        tpms: list[int],
        tokens: int,
        deadline: float,
    ) -> None:
        """Read scopes from Redis, with a first lease; concurrent requests share one read."""
        waiting = [self._loading[s] for s in scopes if s in self._loading]
        fresh = [s for s in dict.fromkeys(scopes) if s not in self._loading]
        if fresh:
            future = asyncio.get_running_loop().create_future()
            for s in fresh:
                self._loading[s] = future
            try:
                started = time.time()
                limits = {s: (r, t) for s, r, t in zip(scopes, rpms, tpms, strict=True)}
                calls = [Call(s, *limits[s], *_lease_wanted(*limits[s], tokens)) for s in fresh]
                read = asyncio.ensure_future(backend.read(calls, batch_size=self._batch))
                try:
                    replies = await _within(read, deadline - time.monotonic(), cancel=False)
                except BaseException:
                    # A read that outlasts the request may still reserve a lease in Redis:
                    # left running, its reply is applied when it comes.
                    self._keep_late(read, self._load_late)
                    raise
                self._counts["loads"] += 1
                self._apply(replies, started)
                failed = [s for reply in replies for s in reply.failed]
                if failed:
                    self._scopes_failed(len(failed))
                    raise _ScopesFailedError
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
                # Every waiter re-raises; mark the exception retrieved for the case of none.
                future.exception()
                raise
            finally:
                for s in fresh:
                    self._loading.pop(s, None)
        for other in waiting:
            await _within(asyncio.shield(other), deadline - time.monotonic())

    def _keep_late(
        self, call: asyncio.Future[_T], apply: Callable[[asyncio.Future[_T]], None]
    ) -> None:
        """Apply `call`'s reply whenever it comes; `close` waits for it."""
        self._late.add(call)
        call.add_done_callback(self._late.discard)
        call.add_done_callback(apply)

    def _sync_late(
        self,
        backend: RedisBackend,
        chunk: list[Any],
        call: asyncio.Future[tuple[list[Reply], Heartbeat | None]],
    ) -> None:
        """Apply a sync's reply that came after the sync gave up on it (`sync_timeout`).

        Its charges were kept for the next sync: taken back out, so that they count once (if
        that sync pushed them already, what is taken out stays as a lease Redis counts). Its
        heartbeat and leases are applied as in time.
        """
        if call.cancelled() or call.exception() is not None:
            return  # never ran, or failed: the kept charges go with the next sync
        replies, heartbeat = call.result()
        self._counts["late_replies"] += 1
        if heartbeat is not None:
            self._heard(backend, heartbeat)
        self._apply(replies, None)
        failed = {s for reply in replies for s in reply.failed}
        self._take_back([d for d in chunk if d[0] not in failed])

    def _load_late(self, read: asyncio.Future[list[Reply]]) -> None:
        """Apply a read's reply that came after its request had stopped waiting for it."""
        if read.cancelled() or read.exception() is not None:
            return
        self._counts["late_replies"] += 1
        self._apply(read.result(), None)

    async def _exact(
        self,
        backend: RedisBackend,
        scopes: list[str],
        rpms: list[int],
        tpms: list[int],
        tokens: int,
        requests: int,
        deadline: float,
    ) -> Decision:
        """Check and charge atomically in Redis, pushing these scopes' pending deltas first.

        Every proxy's local spending is already in Redis as leases, so the check is exact; an
        admitted request also brings a new lease for the requests that follow.
        """
        # Requests that would go exact on these scopes meanwhile wait for this reply; they
        # resume only after it is applied below, since nothing awaits in between.
        mine = asyncio.get_running_loop().create_future()
        claimed = [s for s in dict.fromkeys(scopes) if s not in self._exacting]
        for s in claimed:
            self._exacting[s] = mine
        # A kind this check has no limit for keeps its lease: the script could not renew it.
        taken = [
            self._table.take(s, keep_request_lease=not r, keep_token_lease=not t)
            for s, r, t in zip(scopes, rpms, tpms, strict=True)
        ]
        calls = [
            Call(s, r, t, *_lease_wanted(r, t, tokens), *(d if d is not None else (0, 0, 0)))
            for s, r, t, d in zip(scopes, rpms, tpms, taken, strict=True)
        ]
        started = time.time()
        call = asyncio.ensure_future(backend.acquire(calls, tokens, requests))
        try:
            reply = await _within(call, deadline - time.monotonic(), cancel=False)
        except BaseException as exc:
            # The pushed charges are kept for the next sync, in case the script never ran.
            self._restore([(s, *d) for s, d in zip(scopes, taken, strict=True) if d is not None])
            late = _LateExact(taken, scopes, tokens, requests)
            if not call.done():
                # It timed out, or this request was cancelled: the script may still run or
                # have run, and its reply is applied when it comes (`_exact_late`).
                self._keep_late(call, functools.partial(self._exact_late, late))
            if not isinstance(exc, _Errors):
                raise
            self._redis_failed(exc)
            decision, late.uncounted = self._fallback_counted(scopes, rpms, tpms, tokens, requests)
            return decision
        finally:
            for s in claimed:
                self._exacting.pop(s, None)
            mine.set_result(None)

        return self._exact_reply(reply, taken, scopes, rpms, tpms, tokens, requests, started)

    def _exact_reply(
        self,
        reply: Reply,
        taken: list[tuple[int, int, int] | None],
        scopes: list[str],
        rpms: list[int],
        tpms: list[int],
        tokens: int,
        requests: int,
        started: float,
    ) -> Decision:
        self._counts["exact_checks"] += 1
        self._apply([reply], started)
        if reply.failed:
            # The other scopes' deltas reached Redis; the failed ones' are kept for later.
            self._restore(
                [
                    (s, *d)
                    for s, d in zip(scopes, taken, strict=True)
                    if d is not None and s in reply.failed
                ]
            )
            self._scopes_failed(len(reply.failed))
            return self._fallback(scopes, rpms, tpms, tokens, requests)
        return _exact_decision(reply, scopes, rpms, tpms, self._window)

    def _exact_late(self, late: _LateExact, call: asyncio.Future[Reply]) -> None:
        """Apply an exact check's reply that came after its request was answered without it.

        The script pushed the charges that were kept for the next sync: taken out again, so
        they count once. Its leases and totals are applied as in time. If it admitted the
        request, Redis counts it: the policy's local charge for it is taken back, or, if the
        request was not served, the count stays in Redis as a lease of this proxy.
        """
        if call.cancelled() or call.exception() is not None:
            return  # never ran, or failed: the kept charges go with the next sync
        reply = call.result()
        self._counts["late_replies"] += 1
        self._apply([reply], None)
        self._take_back(
            [
                (s, *d)
                for s, d in zip(late.scopes, late.taken, strict=True)
                if d is not None and s not in reply.failed
            ]
        )
        now = self._now()
        if reply.allowed and not reply.failed and not late.uncounted:
            for t in reply.totals:
                self._table.restore(
                    t.scope, t.window_start, -late.requests, -late.tokens, now, self._window
                )

    def _fallback(
        self, scopes: list[str], rpms: list[int], tpms: list[int], tokens: int, requests: int
    ) -> Decision:
        """Answer by the outage policy while Redis is unreachable."""
        return self._fallback_counted(scopes, rpms, tpms, tokens, requests)[0]

    def _fallback_counted(
        self, scopes: list[str], rpms: list[int], tpms: list[int], tokens: int, requests: int
    ) -> tuple[Decision, bool]:
        """`_fallback`, and whether it admitted the request without charging it anywhere."""
        self._counts["fallback_decisions"] += 1
        if self._policy == "deny":
            return Decision(False, None, self._interval, scope=scopes[0]), False
        result = self._table.check(
            scopes,
            rpms,
            tpms,
            tokens,
            self._now(),
            self._window,
            self._proxies,
            offline=True,
            requests=requests,
        )
        if self._policy == "allow" and result[0] != _ADMITTED:
            # Admitted past this proxy's share, uncounted; what fit in it was charged above and
            # reaches Redis when it is back.
            return Decision(True, None, 0.0), True
        return _decision(result, scopes), False

    def _apply(self, replies: list[Reply], started: float | None) -> None:
        """Apply the totals and leases of script replies; `started`, when the round trip
        began, also corrects the clock (None for a late reply, whose round trip would skew it).
        """
        now = self._now() if started is None else self._note_redis_time(replies, started)
        for reply in replies:
            for t in reply.totals:
                if t.restored:
                    # Redis lost this window, and the lease this proxy held in it.
                    self._table.forget_lease(t.scope)
                if t.window_start and not self._table.apply(
                    t.scope,
                    t.window_start,
                    t.requests,
                    t.tokens,
                    now,
                    self._window,
                    t.lease_requests,
                    t.lease_tokens,
                ):
                    logger.debug("table full of unsynced scopes; a scope stays untracked")

    def _note_redis_time(self, replies: list[Reply], started: float) -> float:
        if self._clock is None and replies:
            self._offset = replies[-1].redis_now - (started + time.time()) / 2
        return self._now()

    def _restore(self, deltas: Sequence[Delta | tuple[Any, ...]]) -> None:
        """Keep deltas that may not have reached Redis, to push them again.

        Only charges are kept. A failed call may still have run in Redis, so a charge pushed
        twice counts twice (the limiter then denies early), but a lease given back twice would
        let the fleet overshoot: a give-back that may have failed stays with Redis until the
        window ends instead.
        """
        now = self._now()
        for scope, window_start, requests, tokens in _charges(deltas):
            if not self._table.restore(scope, window_start, requests, tokens, now, self._window):
                self._counts["dropped_deltas"] += 1

    def _take_back(self, deltas: Sequence[Delta | tuple[Any, ...]]) -> None:
        """Undo `_restore` for deltas that a late reply shows Redis counted after all. Charges
        a sync has pushed again meanwhile stay in Redis as a lease of this proxy."""
        now = self._now()
        for scope, window_start, requests, tokens in _charges(deltas):
            self._table.restore(scope, window_start, -requests, -tokens, now, self._window)

    def _redis_failed(self, exc: BaseException) -> None:
        """Count a failed Redis call, log its kind once, and serve by the policy until a sync."""
        self._counts["redis_errors"] += 1
        kind = _error_kind(exc)
        if kind not in self._error_kinds:
            self._error_kinds.add(kind)
            logger.warning(
                "Redis at %s failed (%s); serving by the %r policy until a sync succeeds",
                self._url,
                kind,
                self._policy,
            )
        self._degraded = True

    def _heard(self, backend: RedisBackend, heartbeat: Heartbeat) -> None:
        """Take the live proxies from a heartbeat, and drop every lease if Redis lost them."""
        if heartbeat.rejoined and self._beaten:
            # Redis no longer had this proxy's heartbeat: it restarted empty (or this proxy
            # was silent past the heartbeat's time to live). Leases it held are gone with it;
            # spending them would admit requests no one counts.
            scopes = self._table.forget_leases()
            self._counts["redis_resets"] += 1
            logger.warning(
                "Redis at %s no longer held this proxy's heartbeat (restarted empty, or out "
                "of reach past the heartbeat's time to live); dropped the leases of %d scopes",
                self._url,
                scopes,
            )
        self._beaten = True
        self._proxies = backend.proxies = max(1, heartbeat.proxies)

    def _redis_slow(self) -> bool:
        """The sync in flight has waited longer than an interval, by a timer that ran on time
        (`_Overdue`): Redis is slow or away.

        Until it returns or times out (then the limiter is degraded), requests that need Redis
        are answered by the outage policy instead of queueing behind it.
        """
        return self._sync_watch.overdue

    def _scopes_failed(self, count: int) -> None:
        """Count scopes Redis could not count (keys of another type); only they use the policy."""
        self._counts["redis_errors"] += count
        if _WRONGTYPE not in self._error_kinds:
            self._error_kinds.add(_WRONGTYPE)
            logger.warning(
                "Redis at %s holds keys of another type for %d scope(s) (WRONGTYPE); those "
                "scopes are served by the %r policy until their keys are fixed or expire",
                self._url,
                count,
                self._policy,
            )

    async def _run(self) -> None:
        # `close` sets `_stopping` as well as cancelling this task, so that the loop ends even
        # if a cancellation is swallowed on its way (on Python 3.11, `asyncio.wait_for` did
        # that when the sync used it, and a test run hung in `close`).
        while not self._stopping:
            await asyncio.sleep(self._interval)
            if self._stopping:
                return
            await self._sync_once()

    async def _sync_once(self, *, leaving: bool = False) -> None:
        """Push every pending delta, read the fleet totals back, and beat the heart."""
        async with self._sync_lock:
            await self._sync_locked(leaving)

    async def _sync_locked(self, leaving: bool) -> None:
        backend = self._backend
        if backend is None:
            return

        if self._degraded and not leaving:
            # Drained deltas are invisible to checks until Redis answers: probe first, so that
            # an outage does not hide them for a failing round trip every interval.
            try:
                await backend.ping(self._timeout)
            except _Errors as exc:
                self._redis_failed(exc)
                return

        idle = 0 if leaving else self._idle_drains
        deltas = self._table.drain(self._now(), self._window, idle, self._lease_drains)
        # A round trip carries at most _SYNC_BATCHES batches, so that a backlog (after an
        # outage, or more active scopes than one sync pushes in redis_timeout) is pushed in
        # steps that each fit the timeout, instead of timing out, being given back and pushed
        # again whole on every try.
        step = self._batch * _SYNC_BATCHES
        replies: list[Reply] = []
        prune = not self._beaten or self._since_prune + 1 >= self._prune_every
        for first in range(0, max(len(deltas), 1), step):
            chunk = deltas[first : first + step]
            calls = [
                Call(s, rpm, tpm, want_r, want_t, ws, r, t)
                for s, ws, r, t, want_r, want_t, rpm, tpm in chunk
            ]
            started = time.time()
            self._sync_watch.start()
            call = asyncio.ensure_future(
                backend.sync(
                    calls,
                    batch_size=self._batch,
                    proxy_id=self._proxy_id,
                    heartbeat_ttl=max(5 * self._interval, 2.0),
                    beat=first == 0,
                    prune=prune,
                    leaving=leaving,
                )
            )
            try:
                chunk_replies, heartbeat = await _within(call, self._sync_timeout, cancel=False)
            except BaseException as exc:
                # The charges go with the next sync, in case Redis never ran this one; if it
                # did, its reply takes them back out when it comes (`_sync_late`).
                self._restore(deltas[first:])
                if not call.done():
                    self._keep_late(call, functools.partial(self._sync_late, backend, chunk))
                if not isinstance(exc, _Errors):
                    raise
                self._redis_failed(exc)
                return
            finally:
                self._sync_watch.stop()
            if self._degraded:
                logger.warning("Redis at %s reachable again; syncing normally", self._url)
                self._degraded = False
            if heartbeat is not None:
                self._heard(backend, heartbeat)
            self._apply(chunk_replies, started)
            self._counts["scopes_synced"] += len(chunk)
            replies.extend(chunk_replies)

        failed = {s for reply in replies for s in reply.failed}
        if failed:
            self._restore([d for d in deltas if d[0] in failed])
            self._scopes_failed(len(failed))
        else:
            self._error_kinds.clear()
        self._since_prune = 0 if prune else self._since_prune + 1
        self._counts["syncs"] += 1
        self._table.evict(self._now(), self._window, _EVICT_BUDGET)


class _Overdue:
    """Times the sync round trip in flight: overdue once a timer set an interval after it
    started runs on time and finds it still in flight.

    A timer that runs late says that this process's own event loop was held up (a long
    callback, a proxy's startup work), and then the reply may be waiting in the socket,
    unread: that is not Redis being slow, and the timer looks again a quarter interval later,
    by when the sync has read a reply that was there.
    """

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self.overdue = False

    def start(self) -> None:
        self.stop()
        self._arm(asyncio.get_running_loop(), self._interval)

    def stop(self) -> None:
        self.overdue = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        due = loop.time() + delay
        self._timer = loop.call_at(due, self._fire, loop, due)

    def _fire(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if loop.time() - due <= self._interval / 2:
            self._timer = None
            self.overdue = True
        else:
            self._arm(loop, self._interval / 4)


async def _within(call: Awaitable[_T], timeout: float, *, cancel: bool = True) -> _T:
    """Await `call` for at most `timeout` seconds, then raise TimeoutError.

    Unlike `asyncio.wait_for`, the caller does not also wait for the cancelled call to clean
    up (redis-py may close a connection on cancellation, waiting again on a dead server): the
    call is cancelled and finishes in the background. With `cancel=False` it is left running,
    when the caller gives up or is cancelled, for the caller to take its late outcome.
    """
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(timeout, 0.0))
    except asyncio.CancelledError:
        if cancel:
            task.cancel()
        raise
    if not done:
        if cancel:
            task.cancel()
            task.add_done_callback(_retrieve)
        raise TimeoutError(f"no answer from Redis within {max(timeout, 0.0):.3f} s")
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's outcome retrieved, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def _charges(
    deltas: Sequence[Delta | tuple[Any, ...]],
) -> Iterator[tuple[str, int, int, int]]:
    """The charges in pushed deltas (scope, window start, requests, tokens): their positive
    parts, where any is left; give-backs are never pushed twice."""
    for scope, window_start, pushed_requests, pushed_tokens, *_ in deltas:
        requests, tokens = max(pushed_requests, 0), max(pushed_tokens, 0)
        if requests or tokens:
            yield scope, window_start, requests, tokens


def _error_kind(exc: BaseException) -> str:
    """A short name for a failure, for logs: the class, and Redis's error code if generic."""
    kind = type(exc).__name__
    if type(exc) is ResponseError:
        code = str(exc).split(" ", 1)[0]
        if code.isupper() and code.isalpha():
            kind = f"{kind} {code}"
    return kind


def _lease_wanted(rpm: int, tpm: int, tokens: int) -> tuple[int, int]:
    """The lease a load or an exact check asks for: a few requests' worth, where limited.

    Later syncs size each lease by what the scope used in the last interval.
    """
    return (_FIRST_LEASE if rpm else 0, _FIRST_LEASE * max(tokens, 1) if tpm else 0)


def _log_crash(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.error("the tiered_limiter sync task died", exc_info=exc)


def _validate_one(
    scope: object, rpm: object, tpm: object, tokens: object, requests: object
) -> None:
    """Raise the limiter's own error for the first unusable argument of a one-scope check."""
    _validate.scope(scope)
    _validate.limit(rpm, "rpm")
    _validate.limit(tpm, "tpm")
    _validate.tokens(tokens)
    _validate.requests(requests)


def _unpack(limits: Sequence[Limit]) -> tuple[list[str], list[int], list[int]]:
    if isinstance(limits, (str, bytes)) or not hasattr(limits, "__iter__"):
        raise InvalidTypeError(f"limits must be a sequence of Limit, got {type(limits).__name__}")
    if not limits:
        raise InvalidArgumentError("limits must name at least one scope, got none")
    scopes: list[str] = []
    rpms: list[int] = []
    tpms: list[int] = []
    for i, item in enumerate(limits):
        if not isinstance(item, Limit):
            raise InvalidTypeError(f"limits[{i}] must be a Limit, got {type(item).__name__}")
        scopes.append(_validate.scope(item.scope, f"limits[{i}].scope"))
        rpms.append(_validate.limit(item.rpm, f"limits[{i}].rpm"))
        tpms.append(_validate.limit(item.tpm, f"limits[{i}].tpm"))
    return scopes, rpms, tpms


def _decision(result: tuple[int, int, int, int, float], scopes: Sequence[str]) -> Decision:
    outcome, index, rem_requests, rem_tokens, retry_after = result
    return Decision(
        outcome == _ADMITTED,
        None if rem_requests < 0 else rem_requests,
        retry_after,
        None if rem_tokens < 0 else rem_tokens,
        scopes[index] if index >= 0 else None,
    )


def _exact_decision(
    reply: Reply, scopes: list[str], rpms: list[int], tpms: list[int], window: int
) -> Decision:
    """A decision from the exact script's totals, which already include this request.

    The lease just reserved for this proxy is still this proxy's to spend, so it does not
    count as used; other proxies' leases do, since only they may spend them.
    """
    totals = reply.totals
    rem_r = [r - t.requests + t.lease_requests for r, t in zip(rpms, totals, strict=True) if r]
    rem_t = [tp - t.tokens + t.lease_tokens for tp, t in zip(tpms, totals, strict=True) if tp]
    remaining = max(0, min(rem_r)) if rem_r else None
    remaining_tokens = max(0, min(rem_t)) if rem_t else None
    if reply.allowed:
        return Decision(True, remaining, 0.0, remaining_tokens)

    index = reply.denied_index
    denied = reply.totals[index] if 0 <= index < len(reply.totals) else reply.totals[0]
    retry_after = max(0.0, denied.window_start + window - reply.redis_now)
    return Decision(False, remaining, retry_after, remaining_tokens, scopes[max(index, 0)])
