"""Faults around the limiter, each against a redis-server the test starts, stops or breaks.

Windows move on the injected clock; the sync task runs on real time with a short interval, and
every wait polls what the limiter or Redis shows, with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from tiered_limiter import Decision, Limit, TieredLimiter

from .conftest import FakeClock
from .relay import HeldReplies
from .support import RedisServer, free_port

KEY = "api_key:" + "ef" * 32
WARM = 10**9  # a limit load never reaches: every warm admission is charged
INTERVAL = 0.1
TIMEOUT = 0.25
LOGGER = "tiered_limiter._limiter"


def counts(server: RedisServer, scope: str) -> tuple[int | None, int, float]:
    r = server.client()
    try:
        ws, req, tok = r.mget(f"{{{scope}}}:window", f"{{{scope}}}:requests", f"{{{scope}}}:tokens")
        return (int(ws) if ws else None, int(req or 0), float(tok or 0))
    finally:
        r.close()


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, what: str
) -> float:
    """Poll `predicate` until it holds; return the seconds it took, fail after `timeout`."""
    started = time.monotonic()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.002)  # yield to the sync task between polls


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


async def settled(lim: TieredLimiter) -> None:
    """Two syncs with no charge between them. With `idle_release` at one interval every scope
    gives back its lease at the second, so Redis then holds exactly what was charged."""
    await lim.sync()
    await lim.sync()


def limiter(url: str, clock: FakeClock, **kw: Any) -> TieredLimiter:
    options: dict[str, Any] = {
        "sync_interval": INTERVAL,
        "redis_timeout": TIMEOUT,
        "window": 60,
        "clock": clock,
    }
    return TieredLimiter(url, **(options | kw))


async def timed(call: Awaitable[Decision]) -> tuple[Decision, float]:
    started = time.monotonic()
    decision = await call
    return decision, time.monotonic() - started


@pytest.mark.parametrize("policy", ["local", "allow", "deny"])
async def test_redis_killed_under_load_then_restarted(
    server: RedisServer, clock: FakeClock, policy: str
) -> None:
    """No request fails or waits past redis_timeout; the policy answers; deltas survive."""
    old, young = "user:old-window", "user:young-window"
    async with limiter(server.url, clock, on_redis_down=policy) as lim:
        assert (await lim.acquire(old, rpm=WARM)).allowed
        clock.advance(40)
        assert (await lim.acquire(young, rpm=WARM)).allowed
        await lim.sync()
        # The charge, and the lease this proxy holds (which it spends first in the outage).
        held = counts(server, young)[1] - 1
        assert held >= 0
        server.stop()
        slowest = 0.0
        admitted = {old: 0, young: 0}
        cold: list[Decision] = []
        iterations = 0
        started = time.monotonic()
        # Load until the outage is noticed, and a few intervals more.
        while time.monotonic() - started < 4 * INTERVAL or not lim.stats()["degraded"]:
            for scope in (old, young):
                decision, took = await timed(lim.acquire(scope, rpm=WARM))
                admitted[scope] += decision.allowed
                slowest = max(slowest, took)
            if iterations % 20 == 0:
                decision, took = await timed(lim.acquire(f"user:cold-{len(cold)}", rpm=5))
                cold.append(decision)
                slowest = max(slowest, took)
            iterations += 1
            assert time.monotonic() - started < 10, "the outage was never noticed"
            await asyncio.sleep(0)  # let the sync task run, as a server's event loop would
        assert slowest <= TIMEOUT + 0.05, slowest
        assert lim.stats()["redis_errors"] >= 1
        assert lim.stats()["fallback_decisions"] >= 1
        # Warm scopes keep being served from local state whatever the policy.
        assert admitted[old] > 0
        assert admitted[young] > 0

        during = cold[-1]
        if policy == "deny":
            assert not during.allowed
            assert during.retry_after == INTERVAL
        else:
            # A local window: this proxy alone, five requests, then denied until it ends. With
            # one proxy, "allow" admits the same: past this proxy's share it would admit more.
            assert during.allowed
            assert during.remaining == 4
            scope = f"user:cold-{len(cold) - 1}"
            local = [await lim.acquire(scope, rpm=5) for _ in range(5)]
            assert [d.allowed for d in local] == [True] * 4 + [False]
            cold += local

        # The old scope's window ends during the outage; the young one's is still open.
        clock.advance(25)
        if policy != "deny":
            # What the outage admitted past the leases waits to be pushed.
            assert lim.stats()["pending"] >= 2
        server.start()
        returned = time.monotonic()
        recovery = await until(lambda: not lim.stats()["degraded"], 5.0, "recovery")
        syncs = lim.stats()["syncs"]
        await until(lambda: lim.stats()["syncs"] > syncs, 5.0, "a whole sync")
        pushed_after = time.monotonic() - returned
        print(
            f"{len(cold)} cold scopes: sync back {recovery * 1000:.0f} ms after Redis returned, "
            f"backlog pushed after {pushed_after * 1000:.0f} ms"
        )
        # Two intervals by design (the next tick, then a sync); the timeout on top is room
        # for a loaded machine, not part of the bound.
        assert recovery <= 2 * INTERVAL + TIMEOUT, recovery

    # Closed: every lease is given back, so Redis holds charges only. The young scope's window
    # was restored in the empty Redis from the pushed deltas: every admission of the outage is
    # there but those the lease held before it covered (Redis lost that lease with the
    # restart, as it lost every count before it). Nothing went into a new window of the old
    # scope.
    assert admitted[young] - held <= counts(server, young)[1] <= admitted[young]
    assert counts(server, old) == (None, 0, 0.0)
    # What the policy admitted from local state was counted, and reached Redis too.
    r = server.client()
    pushed = sum(int(r.get(f"{{user:cold-{i}}}:requests") or 0) for i in range(len(cold)))
    r.close()
    assert pushed == sum(d.allowed for d in cold)


async def test_sync_back_to_normal_within_two_intervals(clock: FakeClock) -> None:
    """Measured over several outages: Redis returns, the next sync succeeds."""
    with RedisServer() as server:
        async with limiter(server.url, clock) as lim:
            times = []
            for i in range(5):
                server.stop()
                await until(lambda: lim.stats()["degraded"], 5.0, "the outage noticed")
                assert lim.try_acquire(KEY, rpm=1000) is not None
                server.start()
                times.append(await until(lambda: not lim.stats()["degraded"], 5.0, f"recovery {i}"))
    print("recovery after restart, ms:", [round(t * 1000) for t in times])
    # Two intervals by design; the timeout on top is room for a loaded machine.
    assert max(times) <= 2 * INTERVAL + TIMEOUT, times


async def test_slow_redis_never_slows_a_warm_check(server: RedisServer, clock: FakeClock) -> None:
    """While Redis is paused, warm checks answer at once and only one sync is in flight.

    A check within the scope's lease never waits. Once the sync has been stuck for an
    interval, a check past the lease is answered by the policy instead of waiting on Redis.
    """
    async with limiter(server.url, clock, redis_timeout=0.5) as lim:
        assert (await lim.acquire(KEY, rpm=100_000)).allowed
        backend = lim._backend
        assert backend is not None
        in_flight, most = 0, 0
        real_sync = backend.sync

        async def counting_sync(*args: Any, **kwargs: Any) -> Any:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            try:
                return await real_sync(*args, **kwargs)
            finally:
                in_flight -= 1

        backend.sync = counting_sync  # type: ignore[method-assign]
        admin = server.client()
        admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        try:
            await until(lambda: in_flight == 1, 5.0, "a sync stuck on the paused Redis")
            await until(lambda: lim.stats()["degraded"], 5.0, "the stuck sync noticed")
            # A second sync asked for by hand queues behind the stuck one.
            extra = asyncio.create_task(lim.sync())
            admitted = 0
            started = time.monotonic()
            for _ in range(2000):
                decision = lim.try_acquire(KEY, rpm=100_000)
                assert decision is not None
                admitted += decision.allowed
            for _ in range(200):
                admitted += (await asyncio.wait_for(lim.acquire(KEY, rpm=100_000), 0.05)).allowed
            warm = time.monotonic() - started
            assert in_flight == 1
            assert admitted == 2200
            print(f"2200 warm checks during the pause: {warm * 1000:.1f} ms")
            assert warm < 0.25
            errors = lim.stats()["redis_errors"]
            await until(
                lambda: lim.stats()["redis_errors"] > errors, 5.0, "the stuck sync timing out"
            )
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.close()
        await extra
        await until(lambda: not lim.stats()["degraded"], 5.0, "recovery after the pause")
        await lim.sync()
        assert most == 1
        # A sync whose reply was lost may be counted again (docs/limitations.md): never less.
        assert counts(server, KEY)[1] >= 2201


async def test_a_loop_held_up_past_an_interval_is_not_redis_being_slow(
    server: RedisServer, clock: FakeClock
) -> None:
    """A sync looks overdue by the clock when this process's own event loop was held up (a long
    callback; a proxy's startup work) while Redis's reply waited in the socket. A cold scope
    then still waits for Redis, within `redis_timeout`, instead of taking the outage policy
    (under fail-closed enforcement, a LiteLLM proxy answered such first requests with 503)."""
    async with (
        HeldReplies(server.port) as relay,
        # A generous redis_timeout: the read must not time out on a starved machine either.
        limiter(relay.url, clock, sync_interval=0.5, redis_timeout=2.0) as lim,
    ):
        relay.hold()
        await relay.reply_held()  # a sync's reply, on its way
        relay.release()
        # The fault itself, not a wait: a callback holds the loop for three intervals, and the
        # reply is forwarded and read only after it.
        time.sleep(1.5)  # noqa: ASYNC251  # blocking the loop is the point
        assert (await lim.acquire("user:cold-after-a-stall", rpm=10)).allowed
        assert lim.stats()["fallback_decisions"] == 0
        assert lim.stats()["loads"] == 1


async def test_redis_restarted_empty_rebuilds_counts(server: RedisServer, clock: FakeClock) -> None:
    """After an empty restart, counts come back from the next syncs, never negative or stuck."""
    async with limiter(server.url, clock, idle_release=INTERVAL) as lim:
        for _ in range(10):
            assert (await lim.acquire(KEY, rpm=1000, tpm=100_000, tokens=100)).allowed
        await settled(lim)
        assert counts(server, KEY)[1:] == (10, 1000)

        server.stop()
        server.start()
        # A refund of tokens the empty Redis no longer holds is dropped, never taken from the
        # counts that follow (the sync fails on the dead connection, or restores the window).
        lim.record(KEY, tokens=-900)
        await lim.sync()
        for _ in range(3):
            assert (await lim.acquire(KEY, rpm=1000, tpm=100_000, tokens=10)).allowed
        syncs = lim.stats()["syncs"]
        await until(lambda: lim.stats()["syncs"] > syncs, 5.0, "a sync to the new server")
        await settled(lim)
        ws, req, tok = counts(server, KEY)
        assert ws is not None
        assert req == 3
        # The 30 charged since, less what the refund's remainder, still held locally as
        # spendable when Redis came back, paid for (it is void once the window is restored).
        assert 0.0 <= tok <= 30.0
        r = server.client()
        ttls = [r.ttl(f"{{{KEY}}}:{s}") for s in ("window", "requests", "tokens")]
        r.close()
        # Every key that exists expires with the window (-2: no tokens charged, no key).
        assert 0 < ttls[0] <= 60, ttls
        assert all(0 < t <= 60 for t in ttls if t != -2), ttls

        for _ in range(5):
            await lim.acquire(KEY, rpm=1000, tpm=100_000, tokens=10)
        await settled(lim)
        assert counts(server, KEY)[1:] == (8, tok + 50)
        decision = await lim.acquire(KEY, rpm=1000, tpm=100_000, tokens=10)
        assert decision.remaining == 1000 - 9
        assert decision.remaining_tokens == 100_000 - (tok + 60)


async def test_a_lease_lost_with_an_empty_restart_is_not_spent(
    server: RedisServer, clock: FakeClock
) -> None:
    """Redis restarted empty forgets this proxy's lease: the next heartbeat notices, and from
    then on every admission is counted again, with no give-back taken from the new counts."""
    scope = "team:restarted"
    # A lease horizon of one interval: the sync below pushes the first admission, which Redis
    # then loses with its state (what was admitted since the last push would be pushed again).
    async with limiter(server.url, clock, lease_horizon=INTERVAL) as lim:
        assert (await lim.acquire(scope, rpm=1000)).allowed
        await lim.sync()
        assert counts(server, scope)[1] > 1, "a lease is held"
        server.stop()
        server.start()
        # The next heartbeat finds this proxy missing: Redis lost its state, leases included.
        await until(lambda: lim.stats()["redis_resets"] == 1, 5.0, "the lost leases noticed")
        for _ in range(20):
            assert (await lim.acquire(scope, rpm=1000)).allowed
        await lim.sync()
    # Closed, every lease given back: exactly the admissions since the restart was noticed.
    assert counts(server, scope)[1] == 20


# The killed proxy's lease horizon, the default, which bounds what its unspent lease holds.
HORIZON = 10.0


def _killed_proxy(url: str, admitted: Any, syncs: Any) -> None:
    async def main() -> None:
        async with TieredLimiter(
            url, sync_interval=INTERVAL, window=60, redis_timeout=1.0, lease_horizon=HORIZON
        ) as lim:
            while True:
                for _ in range(50):
                    if (await lim.acquire(KEY, rpm=2**32 - 1)).allowed:
                        admitted.value += 1
                syncs.value = lim.stats()["syncs"]
                await asyncio.sleep(0)  # a server's loop yields between requests

    asyncio.run(main())


@pytest.mark.slow
def test_killed_proxy_loses_at_most_one_interval(redis_url: str, redis_server: RedisServer) -> None:
    ctx = mp.get_context("spawn")
    admitted = ctx.Value("q", 0, lock=False)
    syncs = ctx.Value("q", 0, lock=False)
    proc = ctx.Process(target=_killed_proxy, args=(redis_url, admitted, syncs), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while syncs.value < 5:
            assert time.monotonic() < deadline, "the proxy never synced"
            assert proc.is_alive()
            time.sleep(0.005)  # polling another process's shared counter
        history = []
        until_kill = time.monotonic() + 0.5
        while time.monotonic() < until_kill:
            history.append((time.monotonic(), admitted.value))
            time.sleep(0.002)  # sampling the admission rate before the kill
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        killed_at = time.monotonic()
        proc.join(timeout=10)
    finally:
        if proc.is_alive():
            proc.kill()
    total = admitted.value
    in_redis = counts(redis_server, KEY)[1]
    # Negative when the lease the killed proxy held outlives it, counted until its window ends.
    lost = total - in_redis
    # Admissions within the last interval before the kill (plus the sync's own duration).
    recent = total - max(v for t, v in history if t <= killed_at - 2 * INTERVAL)
    rate = (history[-1][1] - history[0][1]) / (history[-1][0] - history[0][0])
    print(
        f"killed proxy: admitted {total}, in Redis {in_redis}, lost {lost} "
        f"= {lost / rate:.3f} s of admissions (interval {INTERVAL} s)"
    )
    # The kill can land between an admission and the child's own count of it. Admissions from
    # its lease were counted in Redis before they were made; what it leased and did not spend
    # stays counted: early denials for the rest of the window, never late ones. That is at most
    # a lease: `lease_horizon` and an interval at the pace the scope was last settled at, plus
    # the floor; the pace is taken as up to twice the measured rate.
    assert -(2 * rate * (HORIZON + INTERVAL) + 5) <= lost <= recent


def _faulty(kind: str, port: int) -> RedisServer:
    if kind == "readonly":
        # A replica of a primary that is not there: it answers reads and refuses writes.
        return RedisServer("--replicaof", "127.0.0.1", str(free_port()), port=port)
    return RedisServer("--maxmemory", "1", "--maxmemory-policy", "noeviction", port=port)


@pytest.mark.parametrize(
    ("kind", "error"),
    [("readonly", "ReadOnlyError"), ("oom", "OutOfMemoryError")],
)
@pytest.mark.parametrize("policy", ["local", "allow", "deny"])
async def test_redis_answering_errors_is_served_by_the_policy(
    clock: FakeClock, caplog: pytest.LogCaptureFixture, kind: str, error: str, policy: str
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with _faulty(kind, free_port()) as server:
        async with limiter(server.url, clock, on_redis_down=policy) as lim:
            await until(lambda: lim.stats()["redis_errors"] >= 3, 5.0, "three failed syncs")
            assert lim.stats()["degraded"]
            decisions = [await lim.acquire(f"user:u-{i % 3}", rpm=2) for i in range(9)]
            assert lim.stats()["fallback_decisions"] >= 1
            syncs = lim.stats()["redis_errors"]
            await until(lambda: lim.stats()["redis_errors"] > syncs + 2, 5.0, "more failures")
    if policy == "deny":
        assert not any(d.allowed for d in decisions)
    else:
        # What this process knows is over the limit is denied under any policy.
        assert [d.allowed for d in decisions] == [True] * 6 + [False] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and error in r.message]
    assert len(warnings) == 1, [r.message for r in caplog.records]


@pytest.mark.parametrize("policy", ["local", "allow", "deny"])
async def test_key_of_another_type_fails_only_its_scope(
    server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture, policy: str
) -> None:
    """A WRONGTYPE at one scope's key: that scope uses the policy, every other syncs normally."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    bad, good = "end_user:poisoned", "end_user:fine"
    r = server.client()
    r.rpush(f"{{{bad}}}:window", "not a number")
    async with limiter(server.url, clock, on_redis_down=policy, idle_release=INTERVAL) as lim:
        decisions = [await lim.acquire(bad, rpm=2) for _ in range(3)]
        for _ in range(4):
            assert (await lim.acquire(good, rpm=100)).allowed
        errors = lim.stats()["redis_errors"]
        assert errors >= 1
        await settled(lim)
        assert not lim.stats()["degraded"]
        assert counts(server, good)[1] == 4
        assert r.lrange(f"{{{bad}}}:window", 0, -1) == ["not a number"]

        # Fixed by an operator: the kept deltas of the open window reach Redis.
        r.delete(f"{{{bad}}}:window")
        await settled(lim)
        assert counts(server, bad)[1] == sum(d.allowed for d in decisions)
    r.close()
    if policy == "deny":
        assert not any(d.allowed for d in decisions)
    else:
        assert [d.allowed for d in decisions] == [True, True, False]
    warnings = [r for r in caplog.records if "WRONGTYPE" in r.message]
    assert len(warnings) == 1, [r.message for r in caplog.records]
    assert warnings[0].levelno == logging.WARNING


async def test_wrongtype_in_a_batch_charges_the_other_scopes_once(
    server: RedisServer, clock: FakeClock
) -> None:
    """A failing scope in the middle of a batch leaves no partial charge to be pushed twice."""
    scopes = [f"user:batch-{i}" for i in range(6)]
    async with limiter(server.url, clock, idle_release=INTERVAL) as lim:
        for s in scopes:
            assert (await lim.acquire(s, rpm=100, tpm=10_000, tokens=7)).allowed
        await settled(lim)
        r = server.client()
        r.delete(f"{{{scopes[3]}}}:tokens")
        r.hset(f"{{{scopes[3]}}}:tokens", "x", "1")
        for s in scopes:
            await lim.acquire(s, rpm=100, tpm=10_000, tokens=7)
        for _ in range(3):
            await lim.sync()
        for i, s in enumerate(scopes):
            if i != 3:
                assert counts(server, s)[1:] == (2, 14.0), s
        # The poisoned scope's requests were not charged without its tokens.
        assert r.get(f"{{{scopes[3]}}}:requests") == "1"
        assert lim.stats()["pending"] == 1
        r.delete(f"{{{scopes[3]}}}:tokens")
        await settled(lim)
        assert counts(server, scopes[3])[1:] == (2, 7.0)
        r.close()


async def test_exact_check_on_a_poisoned_scope_charges_nothing(
    server: RedisServer, clock: FakeClock
) -> None:
    bad, good = "team:poisoned", "user:ok"
    async with limiter(server.url, clock, on_redis_down="deny") as lim:
        assert (await lim.acquire(bad, rpm=1000)).allowed
        await lim.sync()
        r = server.client()
        r.delete(f"{{{bad}}}:requests")
        r.sadd(f"{{{bad}}}:requests", "x")
        # rpm=2 on the good scope forces the exact path (near its limit).
        decision = await lim.acquire_many([Limit(good, rpm=1), Limit(bad, rpm=1000)])
        assert not decision.allowed
    # Closed, every lease given back: the good scope was charged nothing.
    assert int(r.get(f"{{{good}}}:requests") or 0) == 0
    r.close()
