"""TieredLimiter against a real redis-server: semantics, keys, windows and failures."""

from __future__ import annotations

import asyncio
import math

import pytest
import redis as redis_sync

from tiered_limiter import (
    Decision,
    InvalidArgumentError,
    InvalidTypeError,
    Limit,
    RedisUnavailableError,
    TieredLimiter,
)

from .conftest import FakeClock
from .relay import HeldReplies
from .support import RedisServer, free_port

KEY = "api_key:" + "ab" * 32

# A sync interval long enough that the background task never runs during a test: the tests
# call `sync()` themselves, so every push happens at a point the test chose.
QUIET = 30.0


def limiter(redis_url: str | None, clock: FakeClock, **kw: object) -> TieredLimiter:
    return TieredLimiter(redis_url, sync_interval=QUIET, window=60, clock=clock, **kw)  # type: ignore[arg-type]


def counts(url: str, scope: str) -> tuple[int | None, int, float]:
    r = redis_sync.Redis.from_url(url, decode_responses=True)
    try:
        ws = r.get(f"{{{scope}}}:window")
        req = r.get(f"{{{scope}}}:requests")
        tok = r.get(f"{{{scope}}}:tokens")
        return (int(ws) if ws else None, int(req or 0), float(tok or 0))
    finally:
        r.close()


async def test_without_redis_admits_exactly_the_limit(clock: FakeClock) -> None:
    async with limiter(None, clock) as lim:
        results = [await lim.acquire(KEY, rpm=5) for _ in range(8)]
    assert [d.allowed for d in results] == [True] * 5 + [False] * 3
    assert results[4].remaining == 0
    assert results[5].scope == KEY
    assert 59.0 <= results[5].retry_after <= 60.0


async def test_window_rolls_over_on_the_injected_clock(clock: FakeClock) -> None:
    async with limiter(None, clock) as lim:
        assert [(await lim.acquire(KEY, rpm=2)).allowed for _ in range(3)] == [True, True, False]
        clock.advance(59.5)
        assert not (await lim.acquire(KEY, rpm=2)).allowed
        clock.advance(1.0)
        assert (await lim.acquire(KEY, rpm=2)).allowed


async def test_warm_scope_at_a_steady_rate_never_waits_on_redis(
    redis_url: str, clock: FakeClock
) -> None:
    async with limiter(redis_url, clock) as lim:
        assert lim.try_acquire(KEY, rpm=1000) is None
        for _ in range(2):  # two intervals at the steady rate size the lease to it
            for _ in range(4):
                assert (await lim.acquire(KEY, rpm=1000)).allowed
            await lim.sync()
        exact = lim.stats()["exact_checks"]
        for _ in range(20):  # 20 intervals at 4 requests each; syncs size the lease to it
            later = [lim.try_acquire(KEY, rpm=1000) for _ in range(4)]
            assert all(d is not None and d.allowed for d in later)
            await lim.sync()
        assert lim.stats()["loads"] == 1
        assert lim.stats()["exact_checks"] == exact


async def test_sync_writes_litellm_keys_and_ttls(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock) as lim:
        for _ in range(7):
            assert (await lim.acquire(KEY, rpm=100, tpm=10_000, tokens=10)).allowed
    # Leaving gives back every unspent lease, so Redis holds exactly what was admitted.
    ws, req, tok = counts(redis_url, KEY)
    assert ws == math.floor(clock.now)
    assert (req, tok) == (7, 70)
    r = redis_sync.Redis.from_url(redis_url)
    # TTLs in seconds, never milliseconds: they end with the window.
    ttls = [r.ttl(f"{{{KEY}}}:{suffix}") for suffix in ("window", "requests", "tokens")]
    r.close()
    assert all(0 < t <= 60 for t in ttls), ttls


async def test_two_syncs_do_not_count_a_delta_twice(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock) as lim:
        for _ in range(4):
            await lim.acquire(KEY, rpm=100)
        await lim.sync()
        await lim.sync()
        assert counts(redis_url, KEY)[1] == 4
        await lim.acquire(KEY, rpm=100)
        await lim.sync()
        assert counts(redis_url, KEY)[1] == 5


async def test_denies_when_fleet_total_reaches_limit(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock) as a, limiter(redis_url, clock) as b:
        await a.sync()
        await b.sync()
        admitted = 0
        for _ in range(10):
            admitted += (await a.acquire(KEY, rpm=10)).allowed
            admitted += (await b.acquire(KEY, rpm=10)).allowed
            await a.sync()
            await b.sync()
        assert admitted == 10
        assert counts(redis_url, KEY)[1] == 10
        assert not (await a.acquire(KEY, rpm=10)).allowed
        assert not (await b.acquire(KEY, rpm=10)).allowed


async def test_other_proxy_sees_fleet_total_after_sync(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock) as b:
        async with limiter(redis_url, clock) as a:
            await a.acquire(KEY, rpm=1000)
            await b.acquire(KEY, rpm=1000)
            for _ in range(30):
                await a.acquire(KEY, rpm=1000)
        await b.sync()
        decision = await b.acquire(KEY, rpm=1000)
        # b's own unspent lease is capacity of its own, so only admissions count against it.
        assert decision.remaining == 1000 - 33


async def test_leases_are_counted_in_redis_and_given_back(redis_url: str, clock: FakeClock) -> None:
    """Local spending is reserved in Redis first, so any proxy's exact check sees it."""
    async with limiter(redis_url, clock) as lim:
        await lim.acquire(KEY, rpm=100)
        reserved = counts(redis_url, KEY)[1]
        assert reserved > 1
        for _ in range(reserved - 1):
            assert lim.try_acquire(KEY, rpm=100) is not None
        assert counts(redis_url, KEY)[1] == reserved
    assert counts(redis_url, KEY)[1] == reserved


async def test_denied_requests_charge_nothing(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock) as lim:
        results = [await lim.acquire(KEY, rpm=3) for _ in range(10)]
        await lim.sync()
    assert sum(d.allowed for d in results) == 3
    assert counts(redis_url, KEY)[1] == 3


async def test_denial_of_one_scope_charges_no_scope(redis_url: str, clock: FakeClock) -> None:
    user, team = "user:u-1", "team:t-1"
    async with limiter(redis_url, clock) as lim:
        assert (await lim.acquire(team, rpm=1)).allowed
        decision = await lim.acquire_many([Limit(user, rpm=10), Limit(team, rpm=1)])
        await lim.sync()
    assert not decision.allowed
    assert decision.scope == team
    assert counts(redis_url, user)[1] == 0
    assert counts(redis_url, team)[1] == 1


async def test_token_estimate_is_corrected_after_the_call(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock) as lim:
        assert (await lim.acquire(KEY, tpm=1000, tokens=300)).allowed
        lim.record(KEY, tokens=-120)
        await lim.sync()
        lim.record(KEY, tokens=50)
    assert counts(redis_url, KEY)[2] == 230


async def test_token_limit_denies_an_estimate_that_does_not_fit(
    redis_url: str, clock: FakeClock
) -> None:
    async with limiter(redis_url, clock) as lim:
        assert (await lim.acquire(KEY, tpm=1000, tokens=900)).allowed
        decision = await lim.acquire(KEY, tpm=1000, tokens=200)
        assert not decision.allowed
        assert (await lim.acquire(KEY, tpm=1000, tokens=100)).allowed
        assert not (await lim.acquire(KEY, tpm=1000)).allowed


async def test_delta_of_an_ended_window_is_dropped(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock) as lim:
        for _ in range(5):
            await lim.acquire(KEY, rpm=100)
        clock.advance(61)
        await lim.sync()
        assert (await lim.acquire(KEY, rpm=100)).allowed
    ws, req, _ = counts(redis_url, KEY)
    assert (ws, req) == (math.floor(clock.now), 1)


async def test_new_window_starts_from_redis_not_the_local_clock(
    redis_url: str, clock: FakeClock
) -> None:
    async with limiter(redis_url, clock) as lim:
        await lim.acquire(KEY, rpm=100)
        await lim.sync()
        opened = counts(redis_url, KEY)[0]
        clock.advance(30)
        await lim.acquire(KEY, rpm=100)
        await lim.sync()
        assert counts(redis_url, KEY)[0] == opened


async def test_keys_carry_the_namespace(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock, namespace="ns1") as lim:
        await lim.acquire(KEY, rpm=10, tokens=5)
        await lim.sync()
    r = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    keys = sorted(k for k in r.scan_iter() if "proxies" not in k)
    r.close()
    assert keys == sorted(f"ns1:{{{KEY}}}:{s}" for s in ("requests", "tokens", "window"))


async def test_deltas_survive_a_failed_sync(clock: FakeClock) -> None:
    server = RedisServer().start()
    try:
        async with limiter(server.url, clock, redis_timeout=0.5) as lim:
            # No limits: every charge waits in the table for the sync (nothing is leased).
            for _ in range(6):
                await lim.acquire(KEY)
            server.stop()
            await lim.sync()
            assert lim.stats()["degraded"]
            assert lim.stats()["pending"] == 1
            server.start()
            await lim.sync()
            assert not lim.stats()["degraded"]
            assert counts(server.url, KEY)[1] == 6
    finally:
        server.stop()


async def test_unreachable_redis_at_start_raises_without_password(clock: FakeClock) -> None:
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    lim = limiter(url, clock, redis_timeout=0.2, connect_timeout=0.3)
    with pytest.raises(RedisUnavailableError) as err:
        await lim.start()
    assert "hunter2" not in str(err.value)
    assert "redis://127.0.0.1:" in str(err.value)


async def test_start_waits_for_a_redis_still_starting(clock: FakeClock) -> None:
    """Redis starting beside the process: the first PING is refused (the server is spawned
    only after it went out) and `start` tries again until it answers."""
    server = RedisServer()
    lim = limiter(server.url, clock, connect_timeout=30.0)
    try:
        await asyncio.gather(lim.start(), asyncio.to_thread(server.start))
        assert (await lim.acquire(KEY, rpm=10)).allowed
        await lim.close()
        assert counts(server.url, KEY)[1] == 1
    finally:
        server.stop()


async def test_start_drops_a_connection_that_never_answers(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    """The first connection is accepted and never answered (a half-open link, a stuck proxy
    in front of Redis): `start` gives that PING up and tries a new connection, instead of
    spending the whole of `connect_timeout` on it."""
    async with HeldReplies(redis_server.port, stall=1) as relay:
        lim = limiter(relay.url, clock, connect_timeout=3.0)
        await lim.start()
        try:
            assert relay.connections >= 2
            assert (await lim.acquire(KEY, rpm=10)).allowed
        finally:
            await lim.close()


async def test_clean_stop_flushes_every_delta(redis_url: str, clock: FakeClock) -> None:
    async with limiter(redis_url, clock) as lim:
        for i in range(20):
            await lim.acquire(f"user:u-{i}", rpm=50, tpm=500, tokens=3)
    for i in range(20):
        assert counts(redis_url, f"user:u-{i}")[1:] == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rpm": 0}, "rpm must be between 1"),
        ({"rpm": -1}, "rpm must be between 1"),
        ({"tpm": 2**32}, "tpm must be between 1"),
        ({"rpm": 1.5}, "rpm must be an int"),
        ({"rpm": math.nan}, "rpm must be an int"),
        ({"tokens": -5}, "tokens must be between 0"),
        ({"tokens": math.nan}, "tokens must be an int"),
        ({"tokens": 2.0}, "tokens must be an int"),
        ({"rpm": True}, "rpm must be an int or None, got bool"),
        ({"tokens": True}, "tokens must be an int, got bool"),
    ],
)
async def test_bad_numbers_raise_before_any_charge(
    clock: FakeClock, kwargs: dict[str, object], message: str
) -> None:
    async with limiter(None, clock) as lim:
        before = lim.stats()
        with pytest.raises((InvalidArgumentError, InvalidTypeError), match=message):
            await lim.acquire(KEY, **kwargs)  # type: ignore[arg-type]
        assert lim.stats() == before
        assert (await lim.acquire(KEY, rpm=1)).allowed


@pytest.mark.parametrize(
    ("scope", "error", "message"),
    [
        ("", InvalidArgumentError, "must not be empty"),
        ("x" * 1025, InvalidArgumentError, "at most 1024 bytes"),
        ("é" * 513, InvalidArgumentError, "at most 1024 bytes"),
        (b"api_key:x", InvalidTypeError, "must be a str, got bytes"),
        (None, InvalidTypeError, "must be a str, got NoneType"),
    ],
)
async def test_bad_scopes_raise(
    clock: FakeClock, scope: object, error: type[Exception], message: str
) -> None:
    async with limiter(None, clock) as lim:
        with pytest.raises(error, match=message):
            await lim.acquire(scope, rpm=1)  # type: ignore[arg-type]
        with pytest.raises(error, match=message):
            lim.record(scope, tokens=1)  # type: ignore[arg-type]
        assert lim.stats()["scopes"] == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync_interval": 0}, "sync_interval must be a positive"),
        ({"sync_interval": -1}, "sync_interval must be a positive"),
        ({"sync_interval": math.nan}, "sync_interval must be a positive"),
        ({"sync_interval": 60, "window": 60}, "sync_interval must be shorter than window"),
        ({"sync_interval": 1e-308}, "sync_interval must be at least 0.001 seconds"),
        ({"idle_release": 1e308}, "idle_release must be at most 86400 seconds"),
        ({"redis_timeout": 86_401}, "redis_timeout must be at most 86400 seconds"),
        ({"window": 0}, "window must be between 1"),
        ({"max_scopes": 0}, "max_scopes must be between 1"),
        ({"on_redis_down": "panic"}, "on_redis_down must be one of local, allow, deny"),
        ({"redis_timeout": 0}, "redis_timeout must be a positive"),
        ({"connect_timeout": float("nan")}, "connect_timeout must be a positive"),
        ({"lease_horizon": 0}, "lease_horizon must be a positive"),
        ({"lease_horizon": math.nan}, "lease_horizon must be a positive"),
    ],
)
def test_bad_configuration_raises(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        TieredLimiter(None, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("horizon", "most"), [(QUIET * 20, 5), (QUIET, 30)])
async def test_a_busy_scope_is_synced_when_its_lease_runs_low(
    redis_url: str, clock: FakeClock, horizon: float, most: int
) -> None:
    """With a horizon of 20 intervals, a scope charged twice an interval lives on its lease
    and is synced a few times in 30 syncs; with a horizon of one interval, at every sync. Either
    way Redis ends with exactly what was admitted once the leases are given back."""
    admitted = 0
    async with TieredLimiter(
        redis_url, sync_interval=QUIET, window=3600, clock=clock, lease_horizon=horizon
    ) as lim:
        for _ in range(30):
            for _ in range(2):
                admitted += (await lim.acquire(KEY, rpm=10**6, tpm=10**8, tokens=10)).allowed
            await lim.sync()
            clock.advance(QUIET)
        synced = lim.stats()["scopes_synced"]
        print(f"horizon {horizon} s: scope synced {synced} times in 30 syncs")
        assert counts(redis_url, KEY)[1] >= admitted, "every admission is counted, leases too"
    assert admitted == 60
    assert 1 <= synced <= most
    if horizon == QUIET:
        assert synced == 30
    assert counts(redis_url, KEY)[1:] == (60, 600.0)


async def test_a_tokens_only_charge_checks_tpm_and_counts_no_request(
    redis_url: str, clock: FakeClock
) -> None:
    """A token reservation after a request's own check (LiteLLM's TPM reservation): tokens are
    checked against tpm and charged, atomically in Redis when the lease does not cover them,
    and no request is counted; a denial charges nothing."""
    scope = "api_key:tokens-only"
    answers = []
    async with limiter(redis_url, clock) as lim:
        for _ in range(5):
            counted = await lim.acquire(scope, rpm=1000, tpm=100)
            assert counted.allowed
            answers.append(await lim.acquire(scope, tpm=100, tokens=30, requests=0))
        assert lim.stats()["exact_checks"] >= 1, "some reservation went to Redis"
    assert [d.allowed for d in answers] == [True, True, True, False, False]
    assert answers[2].remaining_tokens == 10
    assert answers[3].scope == scope
    assert counts(redis_url, scope)[1:] == (5, 90.0)


@pytest.mark.parametrize("requests", [2, -1, True, 1.0])
async def test_requests_must_be_0_or_1(redis_url: str, clock: FakeClock, requests: object) -> None:
    async with limiter(redis_url, clock) as lim:
        with pytest.raises((InvalidArgumentError, InvalidTypeError), match="requests must be"):
            lim.try_acquire(KEY, rpm=10, requests=requests)  # type: ignore[arg-type]
        with pytest.raises((InvalidArgumentError, InvalidTypeError), match="requests must be"):
            await lim.acquire_many([Limit(KEY, rpm=10)], requests=requests)  # type: ignore[arg-type]
        assert lim.stats()["pending"] == 0, "nothing was charged"


def test_redis_of_the_wrong_type_raises() -> None:
    with pytest.raises(InvalidTypeError, match="redis must be a URL"):
        TieredLimiter(42)  # type: ignore[arg-type]


def test_decision_reads_like_a_tuple_and_by_name() -> None:
    decision = Decision(False, 0, 12.5, None, "user:u-1")
    allowed, remaining, retry_after, *_ = decision
    assert (allowed, remaining, retry_after) == (False, 0, 12.5)
    assert decision.scope == "user:u-1"


async def test_a_burst_on_a_scope_without_a_lease_shares_its_exact_checks(
    redis_url: str, clock: FakeClock
) -> None:
    """Requests that would each go exact wait for the check in flight and spend its lease."""
    async with TieredLimiter(redis_url, sync_interval=30, clock=clock) as lim:
        assert (await lim.acquire("api_key:burst", rpm=10_000)).allowed  # load: a first lease
        for _ in range(3):
            assert lim.try_acquire("api_key:burst", rpm=10_000) is not None
        assert lim.try_acquire("api_key:burst", rpm=10_000) is None  # the lease is spent
        before = lim.stats()["exact_checks"]
        burst = await asyncio.gather(*(lim.acquire("api_key:burst", rpm=10_000) for _ in range(16)))
        assert all(d.allowed for d in burst)
        exact = lim.stats()["exact_checks"] - before
        # Each exact check brings a lease of a few requests: far fewer checks than requests.
        assert exact <= 16 // 4 + 1, exact
    r = redis_sync.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert r.get("{api_key:burst}:requests") == "20"  # leases given back on close
    finally:
        r.close()


async def test_a_client_built_from_a_url_never_retries_a_timeout(
    redis_url: str, clock: FakeClock
) -> None:
    """The scripts are not idempotent: a timed-out call must not be sent again."""
    async with limiter(redis_url, clock) as lim:
        assert lim._backend is not None
        retry = lim._backend.client.get_retry()
        assert retry is not None
        assert retry._retries == 1
        assert redis_sync.exceptions.TimeoutError not in retry._supported_errors
        assert redis_sync.exceptions.ConnectionError in retry._supported_errors


async def test_close_returns_even_if_the_sync_task_swallows_its_cancellation(
    redis_url: str, clock: FakeClock
) -> None:
    """On Python 3.11, `asyncio.wait_for` (inside a sync) can swallow a cancellation that comes
    as its call completes; `close` must not then wait on the sync loop forever."""
    lim = TieredLimiter(redis_url, sync_interval=0.05, window=60, clock=clock)
    await lim.start()
    real_sync_once = lim._sync_once
    inside = asyncio.Event()
    swallowed = 0

    async def swallowing(*, leaving: bool = False) -> None:
        nonlocal swallowed
        if leaving or swallowed:
            await real_sync_once(leaving=leaving)
            return
        inside.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            swallowed += 1  # as wait_for on 3.11 can; a second cancellation goes through

    lim._sync_once = swallowing  # type: ignore[method-assign]
    sync_task = lim._task
    assert sync_task is not None
    await inside.wait()
    closing = asyncio.create_task(lim.close())
    done, _ = await asyncio.wait({closing}, timeout=5.0)
    if not done:
        sync_task.cancel()  # end the loop, so that the test fails instead of hanging
        await closing
    assert swallowed == 1
    assert done, "close waited forever on a sync loop that swallowed its cancellation"
