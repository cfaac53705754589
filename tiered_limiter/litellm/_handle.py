"""A LiteLLM `RateLimitsHandle` that answers the window scripts from the tier.

LiteLLM's v3 limiter talks to Redis only through this protocol. This handle answers the
request-window script (RPM), the token reservation (TPM) and every token correction from a
`TieredLimiter`, and passes everything else (max_parallel gauges, reads, the local mirror) to
the stock `NativeRateLimits` it wraps, so those keep LiteLLM's exact behaviour.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from litellm.caching.redis_batch import Batch
from litellm.redis.stores.rate_limits import (
    AtomicCounter,
    AtomicReply,
    CounterIncrement,
    RateLimitCounter,
    RateLimitGauge,
    RateLimitStore,
)
from litellm.rust_bridge._native import (
    AtomicApplied,
    AtomicOverLimit,
    GuardedReply,
    NativeSend,
    WindowCount,
)

from .. import Decision, Limit, TieredLimiter
from ._settings import Settings

logger = logging.getLogger(__name__)

# How long to wait before trying again to start a limiter whose Redis did not answer.
_START_RETRY_SECONDS = 5.0
# How long one read of `fail_closed_rate_limit_enforcement` holds: reading LiteLLM's settings
# costs more than the tier's whole check, and the setting changes only with the config.
_FAIL_CLOSED_SECONDS = 1.0


@dataclass(slots=True)
class RequestLimits:
    """What the hook knows about one request, shared with the handle through a ContextVar.

    Attributes:
        tier: Whether this request takes the tier (the kill switch and the canary).
        limits: Per scope `descriptor_key:descriptor_value`, its (rpm, tpm, window) limits.
        charged: Scopes already charged one request by the tier in this request.
        retry_after: Per scope denied by the tier, seconds until its window ends.
    """

    tier: bool = True
    limits: dict[str, tuple[int | None, int | None, int]] = field(default_factory=dict)
    charged: set[str] = field(default_factory=set)
    retry_after: dict[str, float] = field(default_factory=dict)


REQUEST: contextvars.ContextVar[RequestLimits | None] = contextvars.ContextVar(
    "tiered_limiter_litellm_request", default=None
)


class _Await:
    """An awaitable that builds its coroutine only when awaited, so none leaks if unused."""

    __slots__ = ("_start",)

    def __init__(self, start: Callable[[], Awaitable[Any]]) -> None:
        self._start = start

    def __await__(self) -> Generator[Any, None, Any]:
        return self._start().__await__()


class _Pending:
    """What LiteLLM's `NativePending` offers: `resolve()` returning an awaitable."""

    __slots__ = ("_reply",)

    def __init__(self, reply: Awaitable[Any]) -> None:
        self._reply = reply

    def resolve(self) -> Awaitable[Any]:
        return self._reply


def _unverifiable_error() -> ConnectionError:
    return ConnectionError("tiered_limiter cannot reach Redis to verify the limits")


async def _raise_unverifiable() -> Any:
    raise _unverifiable_error()


def _unverifiable() -> _Await:
    """A reply that raises where LiteLLM awaits it, as a failed script's would."""
    return _Await(_raise_unverifiable)


def _done(value: Any) -> asyncio.Future[Any]:
    """A reply already known: awaiting it does not yield to the event loop, and gathering it
    starts no task."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _scope(counter: Any) -> str:
    return f"{counter.scope.descriptor_key}:{counter.scope.descriptor_value}"


class TieredRateLimits:
    """The handle: the tier for window counters, the stock native store for the rest.

    Args:
        native: LiteLLM's `NativeRateLimits` on the proxy's coordination Redis.
        limiter: The tier, built on the same Redis and namespace, not yet started.
        settings: The adapter's knobs.
        fail_closed: Returns whether `general_settings.fail_closed_rate_limit_enforcement` is on.
    """

    def __init__(
        self,
        native: Any,
        limiter: TieredLimiter,
        settings: Settings,
        fail_closed: Callable[[], bool] = lambda: False,
    ) -> None:
        self._native = native
        self.limiter = limiter
        self._settings = settings
        self._fail_closed = fail_closed
        self._started = False
        self._starting: asyncio.Task[bool] | None = None
        self._next_start = 0.0
        self._fail_closed_on = False
        self._fail_closed_until = -math.inf

    # Lifecycle

    def start_soon(self) -> None:
        """Start the tier in the running loop, if there is one; requests start it otherwise."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._start_task()

    def _start_task(self) -> asyncio.Task[bool]:
        if self._starting is None or (self._starting.done() and not self._started):
            self._starting = asyncio.ensure_future(self._start())
        return self._starting

    async def _start(self) -> bool:
        try:
            await self.limiter.start()
        except Exception as exc:  # the request path must not fail; LiteLLM serves
            self._next_start = time.monotonic() + _START_RETRY_SECONDS
            logger.warning(
                "tiered_limiter could not start (%s); LiteLLM's own limiter serves until it does",
                type(exc).__name__,
            )
            return False
        self._started = True
        logger.info("tiered_limiter started: rate limits served from the in-process tier")
        return True

    async def _ready_to_serve(self) -> bool:
        if self._started:
            return True
        if time.monotonic() < self._next_start:
            return False
        return await self._start_task()

    async def close(self) -> None:
        """Flush pending deltas to Redis and stop the sync task."""
        if self._started:
            self._started = False
            await self.limiter.close()

    # Routing

    def _takes_tier(self, window_size: int | None = None) -> RequestLimits | None:
        request = REQUEST.get()
        if request is None or not request.tier:
            return None
        if window_size is not None and window_size != self._settings.window:
            return None
        return request

    def _tier_for_tokens(self, counters: Sequence[Any]) -> bool:
        """Token corrections take the tier when their request did, judged by its API key."""
        if not all(c.kind == "tokens" for c in counters):
            return False
        request = REQUEST.get()
        if request is not None:
            return request.tier
        for counter in counters:
            if counter.scope.descriptor_key == "api_key":
                return self._settings.takes_tier(counter.scope.descriptor_value)
        return self._settings.share >= 100

    def _fallbacks(self) -> int | None:
        """Under fail-closed enforcement, the tier's count of outage-policy answers; else None.

        A decision that moved the count was not verified against Redis (the scope needed Redis
        and it failed or was too slow), so LiteLLM refuses it with its 503. Admissions within
        a lease are verified: Redis already counts the lease.
        """
        now = time.monotonic()
        if now >= self._fail_closed_until:
            self._fail_closed_on = self._fail_closed()
            self._fail_closed_until = now + _FAIL_CLOSED_SECONDS
        if not self._fail_closed_on:
            return None
        return self._fallback_count()

    def _fallback_count(self) -> int:
        return int(self.limiter.stats()["fallback_decisions"])

    def _unverified(self, before: int | None) -> bool:
        """Whether the tier answered by its outage policy since `_fallbacks()` gave `before`."""
        return before is not None and self._fallback_count() != before

    def _verified(self, before: int | None) -> None:
        if self._unverified(before):
            raise _unverifiable_error()

    # The window scripts, answered by the tier

    def sliding_window(self, counters: Sequence[Any], now: int, window_size: int, send: Any) -> Any:
        """The RPM script: charge one request to every scope, or none, and report the counts."""
        reply = self.window(counters, now, window_size)
        if reply is None:
            return self._native.sliding_window(counters, now, window_size, send)
        return _Pending(reply)

    def window(
        self, counters: Sequence[Any], now: int, window_size: int
    ) -> Awaitable[tuple[WindowCount, ...]] | None:
        """The tier's answer to the RPM script, or None where LiteLLM's own store answers.

        The tier decides at once when it can, so the reply is usually already done: awaiting
        it waits on nothing, neither Redis nor the request's batch of Redis scripts.
        """
        request = self._takes_tier(window_size)
        if request is None:
            return None
        if not self._started:
            return _Await(lambda: self._deferred_window(counters, now, window_size, request))
        limits = self._window_limits(counters, request)
        if limits is None:
            return None

        before = self._fallbacks()
        decision = self._try(limits)
        if decision is not None:
            if self._unverified(before):
                # Raised where LiteLLM awaits the reply, as a failed script would be: there it
                # refunds and answers its 503, while a raise here would escape its handling.
                return _unverifiable()
            return _done(self._window_counts(counters, limits, decision, now, request))

        async def slow() -> tuple[WindowCount, ...]:
            answer = await self._acquire(limits)
            self._verified(before)
            return self._window_counts(counters, limits, answer, now, request)

        return _Await(slow)

    async def _deferred_window(
        self, counters: Sequence[Any], now: int, window_size: int, request: RequestLimits
    ) -> tuple[WindowCount, ...]:
        """The first requests of a worker: start the tier, or let LiteLLM answer meanwhile."""
        limits = self._window_limits(counters, request)
        if limits is not None and await self._ready_to_serve():
            before = self._fallbacks()
            answer = await self._acquire(limits)
            self._verified(before)
            return self._window_counts(counters, limits, answer, now, request)
        pending = self._native.sliding_window(counters, now, window_size, _send_now())
        if pending is None:
            raise ConnectionError("no Redis for the rate limiter")
        return tuple(await pending.resolve())

    def _try(self, limits: Sequence[Limit]) -> Decision | None:
        # One scope, the common case, takes the core's single-scope path: a quarter the cost.
        if len(limits) == 1:
            one = limits[0]
            return self.limiter.try_acquire(one.scope, rpm=one.rpm, tpm=one.tpm)
        return self.limiter.try_acquire_many(limits)

    async def _acquire(self, limits: Sequence[Limit]) -> Decision:
        if len(limits) == 1:
            one = limits[0]
            return await self.limiter.acquire(one.scope, rpm=one.rpm, tpm=one.tpm)
        return await self.limiter.acquire_many(limits)

    def _window_limits(self, counters: Sequence[Any], request: RequestLimits) -> list[Limit] | None:
        """One `Limit` per scope of the script call; None when a limit is unknown."""
        by_scope: dict[str, list[int | None]] = {}
        for counter in counters:
            scope = _scope(counter)
            known = request.limits.get(scope)
            if known is None:
                return None
            rpm, tpm, _window = known
            slot = by_scope.setdefault(scope, [None, None])
            if counter.kind == "requests":
                slot[0] = rpm
            else:
                slot[1] = tpm
        return [Limit(scope, rpm=r, tpm=t) for scope, (r, t) in by_scope.items()]

    def _window_counts(
        self,
        counters: Sequence[Any],
        limits: Sequence[Limit],
        decision: Decision,
        now: int,
        request: RequestLimits,
    ) -> tuple[WindowCount, ...]:
        """Counts as the RPM script would report them, so LiteLLM's verdict matches the tier's.

        A denied request gets `limit + 1` on the denying scope, which makes LiteLLM answer its
        own 429 with its own headers; the tier charged nothing for it.
        """
        by_scope = {limit.scope: limit for limit in limits}
        start = str(now)
        counts: list[WindowCount] = []
        for counter in counters:
            scope = _scope(counter)
            limit = by_scope[scope]
            cap = (limit.rpm if counter.kind == "requests" else limit.tpm) or 0
            left = decision.remaining if counter.kind == "requests" else decision.remaining_tokens
            if not decision.allowed and scope == decision.scope:
                count = cap + 1
                request.retry_after[scope] = decision.retry_after
            elif left is None:
                count = 1 if counter.kind == "requests" else 0
            else:
                count = min(cap, max(0, cap - left))
            counts.append(WindowCount(start, count))
        if decision.allowed:
            request.charged.update(by_scope)
        return tuple(counts)

    def check_and_increment(self, counters: Sequence[Any], send: Any) -> Any:
        """The TPM reservation: one scope's token estimate, checked and charged by the tier."""
        reply = self.reservation(counters)
        if reply is None:
            return self._native.check_and_increment(counters, send)
        return _Pending(reply)

    def reservation(self, counters: Sequence[Any]) -> Awaitable[Any] | None:
        """The tier's answer to a TPM reservation, or None where LiteLLM's own store answers."""
        windows = {c.window_size for c in counters}
        request = self._takes_tier(windows.pop() if len(windows) == 1 else -1)
        if request is None or not self._reservation_fits(counters):
            return None
        if not self._started:
            return _Await(lambda: self._deferred_reservation(counters, request))

        reservation = _Reservation(counters)
        # A reservation of tokens alone (the window check counts the request where the scope
        # has an rpm limit; LiteLLM counts none where it has not) checks and charges tokens only.
        requests = 0 if reservation.rpm is None else 1

        before = self._fallbacks()
        decision = self.limiter.try_acquire(
            reservation.scope,
            rpm=reservation.rpm,
            tpm=reservation.tpm,
            tokens=reservation.tokens,
            requests=requests,
        )
        if decision is not None:
            if self._unverified(before):
                return _unverifiable()
            return _done(reservation.reply(decision, request))

        async def slow() -> Any:
            answer = await self.limiter.acquire(
                reservation.scope,
                rpm=reservation.rpm,
                tpm=reservation.tpm,
                tokens=reservation.tokens,
                requests=requests,
            )
            self._verified(before)
            return reservation.reply(answer, request)

        return _Await(slow)

    async def _deferred_reservation(self, counters: Sequence[Any], request: RequestLimits) -> Any:
        """A reservation before the tier has started: start it, or let LiteLLM answer."""
        if await self._ready_to_serve():
            reply = self.reservation(counters)
            if reply is not None:
                return await reply
        pending = self._native.check_and_increment(counters, _send_now())
        if pending is None:
            raise ConnectionError("no Redis for the rate limiter")
        return await pending.resolve()

    @staticmethod
    def _reservation_fits(counters: Sequence[Any]) -> bool:
        requests = [c for c in counters if c.counter.kind == "requests"]
        tokens = [c for c in counters if c.counter.kind == "tokens"]
        return (
            len({_scope(c.counter) for c in counters}) == 1
            and len(requests) <= 1
            and len(tokens) <= 1
            and all(c.increment == 1 for c in requests)
            and all(c.increment >= 0 for c in tokens)
        )

    # Token corrections, absorbed by the tier

    def guarded_increment(
        self,
        counter: Any,
        expected_window_start: str,
        amount: float,
        ttl_seconds: int | None,
        send: Any,
    ) -> Any:
        if not self._started or not self._tier_for_tokens([counter]):
            return self._native.guarded_increment(
                counter, expected_window_start, amount, ttl_seconds, send
            )
        self.limiter.record(_scope(counter), tokens=round(amount))
        return _Pending(_done(GuardedReply(True, 0)))

    def token_increment(self, increments: Sequence[Any], send: Any) -> Any:
        if not self._started or not self._tier_for_tokens([i.counter for i in increments]):
            return self._native.token_increment(increments, send)
        return _Pending(_done(tuple(self._record(increments))))

    def token_increment_post_call(self, request: Any, increments: Sequence[Any]) -> bool:
        if self.take_tokens(increments):
            return True
        return bool(self._native.token_increment_post_call(request, increments))

    def take_tokens(self, increments: Sequence[Any]) -> bool:
        """Charge token corrections to the tier if their request took it; False leaves them."""
        if not self._started or not self._tier_for_tokens([i.counter for i in increments]):
            return False
        self._record(increments)
        return True

    def increment(self, increment: Any) -> Awaitable[int | float]:
        if not self._started or not self._tier_for_tokens([increment.counter]):
            return self._native.increment(increment)  # type: ignore[no-any-return]
        self._record([increment])
        return _done(float(increment.amount))

    def increment_many(self, increments: Sequence[Any]) -> Awaitable[None]:
        if not self.take_tokens(increments):
            return self._native.increment_many(increments)  # type: ignore[no-any-return]
        return _done(None)

    def increment_many_post_call(self, request: Any, increments: Sequence[Any]) -> None:
        if not self.take_tokens(increments):
            self._native.increment_many_post_call(request, increments)

    def _record(self, increments: Sequence[Any]) -> list[float]:
        request = REQUEST.get()
        known = None if request is None else request.limits
        for item in increments:
            scope = _scope(item.counter)
            # LiteLLM charges every scope of the request, limited or not; the tier tracks only
            # the limited ones and would drop the rest.
            if known is None or scope in known:
                self.limiter.record(scope, tokens=round(item.amount))
        return [float(item.amount) for item in increments]

    # Everything else stays LiteLLM's

    @property
    def has_redis(self) -> bool:
        return bool(self._native.has_redis)

    def slot_groups(self, scopes: Sequence[Any], force: bool) -> list[list[int]]:
        return self._native.slot_groups(scopes, force)  # type: ignore[no-any-return]

    def get_local(self, entry: Any) -> Any:
        return self._native.get_local(entry)

    def set_local(self, entry: Any, value: Any, ttl_seconds: float | None) -> None:
        request = REQUEST.get()
        if request is not None and not isinstance(entry, RateLimitGauge):
            scope = f"{entry.scope.descriptor_key}:{entry.scope.descriptor_value}"
            if scope in request.charged:
                # The tier admitted this scope and answers its next request itself; LiteLLM's
                # mirror of the count would serve nothing and costs a native call per counter.
                return
            # A scope the tier denied is mirrored only until its window ends, not a full
            # window from now, so LiteLLM's local shortcut never outlives the tier's verdict.
            left = request.retry_after.get(scope)
            if left is not None and left > 0 and ttl_seconds is not None:
                ttl_seconds = min(ttl_seconds, left)
        self._native.set_local(entry, value, ttl_seconds)

    def get(self, entry: Any, *, backfill_ttl_seconds: float | None = None) -> Any:
        return self._native.get(entry, backfill_ttl_seconds=backfill_ttl_seconds)

    def read_counters(self, counters: Sequence[Any], send: Any) -> Any:
        return self._native.read_counters(counters, send)

    def parallel_acquire(
        self, gauges: Sequence[Any], slot_ttl_seconds: int, slot_id: str, send: Any
    ) -> Any:
        return self._native.parallel_acquire(gauges, slot_ttl_seconds, slot_id, send)

    def parallel_release(self, gauges: Sequence[Any], slot_id: str, send: Any) -> Any:
        return self._native.parallel_release(gauges, slot_id, send)

    def parallel_count(self, gauges: Sequence[Any], slot_ttl_seconds: int, send: Any) -> Any:
        return self._native.parallel_count(gauges, slot_ttl_seconds, send)

    def parallel_release_post_call(self, request: Any, gauges: Sequence[Any], slot_id: str) -> bool:
        return bool(self._native.parallel_release_post_call(request, gauges, slot_id))


class TieredRateLimitStore(RateLimitStore):
    """LiteLLM's `RateLimitStore` over the handle, letting the tier's answers skip the batch.

    LiteLLM's store puts every script of a request on the request's batch of Redis calls, and
    awaiting any reply sends that batch: with nothing in it, that is still a trip through
    LiteLLM's native runtime and back to the event loop, about 35 us of CPU. A script the tier
    answers needs no Redis, so its reply is handed back as it is; everything else takes
    LiteLLM's path.
    """

    def __init__(self, handle: TieredRateLimits) -> None:
        super().__init__(handle)
        self._tier = handle

    def sliding_window(
        self, counters: Sequence[RateLimitCounter], now: int, window_size: int, *, batch: Batch
    ) -> Awaitable[tuple[WindowCount, ...]]:
        reply = self._tier.window(counters, now, window_size)
        if reply is None:
            return super().sliding_window(counters, now, window_size, batch=batch)
        return reply

    def check_and_increment(
        self, counters: Sequence[AtomicCounter], *, batch: Batch
    ) -> Awaitable[AtomicReply]:
        reply = self._tier.reservation(counters)
        if reply is None:
            return super().check_and_increment(counters, batch=batch)
        return reply

    def token_increment_post_call(self, increments: Sequence[CounterIncrement]) -> bool:
        # Taken here, the request's post-call batch of Redis writes is not even opened.
        return self._tier.take_tokens(increments) or super().token_increment_post_call(increments)


class _Reservation:
    """One scope's TPM reservation as LiteLLM declares it, and the reply its script would give."""

    __slots__ = ("counters", "rpm", "scope", "tokens", "tpm")

    def __init__(self, counters: Sequence[Any]) -> None:
        self.counters = counters
        self.scope = _scope(counters[0].counter)
        self.rpm: int | None = None
        self.tpm: int | None = None
        self.tokens = 0
        for c in counters:
            if c.counter.kind == "requests":
                self.rpm = c.limit
            else:
                self.tpm = c.limit
                self.tokens = c.increment

    def reply(self, decision: Decision, request: RequestLimits) -> AtomicApplied | AtomicOverLimit:
        counters = self.counters
        if not decision.allowed:
            request.retry_after[self.scope] = decision.retry_after
            index = _denied_index(counters, decision, self.tokens)
            denied = counters[index]
            left = (
                decision.remaining
                if denied.counter.kind == "requests"
                else decision.remaining_tokens
            )
            return AtomicOverLimit(index, max(0, denied.limit - (left or 0)), denied.limit)

        request.charged.add(self.scope)
        start = int(time.time())
        replies: list[tuple[int, int]] = []
        for c in counters:
            left = decision.remaining if c.counter.kind == "requests" else decision.remaining_tokens
            count = c.increment if left is None else min(c.limit, max(0, c.limit - left))
            replies.append((count, start))
        return AtomicApplied(replies)


def _denied_index(counters: Sequence[Any], decision: Decision, tokens: int) -> int:
    """Which counter (0-based, as LiteLLM's native reply gives it) a denial is reported on."""
    kinds = [c.counter.kind for c in counters]
    tokens_short = decision.remaining_tokens is not None and decision.remaining_tokens < max(
        1, tokens
    )
    if "tokens" in kinds and (tokens_short or "requests" not in kinds):
        return kinds.index("tokens")
    return kinds.index("requests") if "requests" in kinds else 0


def _send_now() -> Any:
    return NativeSend.Now()
