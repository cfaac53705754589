"""Hostile input: floods of scopes, fuzzed arguments, scope names built to collide, threads."""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from tiered_limiter import (
    Decision,
    InvalidArgumentError,
    InvalidTypeError,
    Limit,
    TieredLimiter,
    _native,
)
from tiered_limiter._redis import RedisBackend

from .conftest import FakeClock

START = 1_800_000_000
OURS = (InvalidArgumentError, InvalidTypeError)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _flood(max_scopes: int, flood: int, protected: int, out: Any) -> None:
    """In a fresh process: `flood` distinct scopes through a table that keeps `max_scopes`."""
    table = _native.Table(max_scopes, 64)
    now = START + 1.0
    before = _rss()
    keep = [f"team:unsynced-{i}" for i in range(protected)]
    for scope in keep:
        # Leased one request, then charged it and a token correction still to push.
        table.apply(scope, START, 1, 0, now, 60, 1, 0)
        assert table.check_one(scope, 10, 0, 0, now, 60, 1)[0] == _native.ADMITTED
        assert table.record(scope, 5, now, 60)
    apply, drain, restore = table.apply, table.drain, table.restore
    for i in range(flood):
        apply(f"end_user:{i}", START, 1, 1, now, 60)
        if i % 10_000 == 9_999:
            # Every sync pushes the flood; the kept scopes' pushes fail and are given back.
            for scope, ws, req, tok, *_ in drain(now, 60, 1):
                if scope.startswith("team:"):
                    restore(scope, ws, req, tok, now, 60)
    stats = table.stats()
    kept = [table.take(scope) for scope in keep]
    out.put(
        {
            "rss_growth": _rss() - before,
            "stats": stats,
            "len": len(table),
            "kept": sum(k == (START, 0, 5) for k in kept),
        }
    )


@pytest.mark.slow
def test_ten_million_scopes_stay_within_max_scopes() -> None:
    max_scopes, flood, protected = 1_000_000, 10_000_000, 1_000
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    proc = ctx.Process(target=_flood, args=(max_scopes, flood, protected, out))
    proc.start()
    result = out.get(timeout=120)
    proc.join(timeout=30)
    assert proc.exitcode == 0
    stats = result["stats"]
    growth = result["rss_growth"]
    print(
        f"10M scopes: RSS grew {growth / 2**20:.1f} MiB, table says "
        f"{stats['memory_bytes'] / 2**20:.1f} MiB for {result['len']} scopes, "
        f"{stats['evictions']} evictions"
    )
    assert result["len"] <= max_scopes
    # Every scope past the cap evicted a synced one; none was refused, none unsynced was lost.
    assert stats["rejected"] == 0
    assert stats["evictions"] == flood + protected - result["len"]
    assert result["kept"] == protected
    # About 29 bytes a scope (24-byte entry, index slot): 48 bytes a scope is the promise.
    assert stats["memory_bytes"] <= max_scopes * 48
    assert growth <= max_scopes * 48 + 16 * 2**20


# Fuzzing: anything a caller could pass.
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(exclude_categories=()), max_size=300),
    st.text(st.sampled_from(["a", ":", "\ud800", "\udfff", "é", "\x00"]), max_size=400),
    st.text(max_size=1100),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.builds(object),
    st.complex_numbers(),
    st.builds(Limit, st.text(max_size=5)),
)
small_ints = st.one_of(st.integers(-3, 10), st.integers(2**31, 2**33), anything)


async def _call_public(lim: TieredLimiter, op: str, a: Any, b: Any, c: Any, d: Any) -> None:
    try:
        if op == "try_acquire":
            result = lim.try_acquire(a, rpm=b, tpm=c, tokens=d)
        elif op == "acquire":
            result = await lim.acquire(a, rpm=b, tpm=c, tokens=d)
        elif op == "try_acquire_many":
            result = lim.try_acquire_many(a, tokens=d)
        elif op == "acquire_many":
            result = await lim.acquire_many(a, tokens=d)
        else:
            lim.record(a, tokens=d)
            result = None
    except OURS:
        return
    assert result is None or isinstance(result, Decision)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["try_acquire", "acquire", "try_acquire_many", "acquire_many", "record"]
            ),
            st.one_of(
                st.sampled_from(["user:a", "api_key:b"]),
                anything,
                st.lists(st.one_of(st.builds(Limit, anything, small_ints, small_ints), anything)),
            ),
            small_ints,
            small_ints,
            small_ints,
        ),
        max_size=20,
    )
)
def test_public_api_raises_only_its_own_errors(ops: list[tuple[Any, ...]]) -> None:
    async def run() -> None:
        clock = FakeClock()
        async with TieredLimiter(None, window=10, clock=clock) as lim:
            for op in ops:
                await _call_public(lim, *op)
                clock.advance(0.7)
            assert isinstance(lim.stats(), dict)

    asyncio.run(run())


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "sync_interval",
                "window",
                "max_scopes",
                "namespace",
                "redis_timeout",
                "connect_timeout",
                "on_redis_down",
                "batch_size",
                "proxy_id",
                "shards",
                "idle_release",
                "lease_horizon",
            ]
        ),
        st.one_of(anything, small_ints),
    ),
    st.one_of(st.none(), anything),
)
def test_constructor_raises_only_its_own_errors(kwargs: dict[str, Any], redis: Any) -> None:
    if isinstance(redis, str):
        redis = None  # a URL string is accepted; connecting is start()'s business
    with contextlib.suppress(*OURS):
        TieredLimiter(redis, **kwargs)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["check", "check_one", "record", "take", "restore", "apply", "evict", "drain"]
            ),
            st.lists(st.one_of(st.sampled_from(["user:a", "user:b"]), anything), min_size=7),
        ),
        max_size=30,
    )
)
def test_native_table_raises_only_value_and_type_errors(ops: list[tuple[str, list[Any]]]) -> None:
    table = _native.Table(8, 2)
    for name, args in ops:
        method = getattr(table, name)
        arity = {"check": 7, "check_one": 7, "record": 4, "take": 1, "restore": 6}
        arity |= {"apply": 6, "evict": 3, "drain": 0}
        try:
            if name in ("check", "check_one"):
                method(*args[:7], offline=bool(args[0]))
            else:
                method(*args[: arity[name]])
        except (ValueError, TypeError, OverflowError):
            pass
    assert len(table) <= 8
    assert set(table.stats()) >= {"scopes", "evictions"}


# Scope names chosen to collide.
scope_text = st.text(alphabet="{}:ab_", min_size=1, max_size=12)


@settings(max_examples=2000, deadline=None)
@given(scope_text, scope_text, st.sampled_from(["", "ns", "a:{b}"]))
def test_redis_keys_of_different_scopes_never_meet(a: str, b: str, namespace: str) -> None:
    backend = RedisBackend(None, namespace=namespace, window=60, clock=None)  # type: ignore[arg-type]
    if a != b:
        assert not set(backend.keys(a)) & set(backend.keys(b))
    assert backend._proxies_key not in backend.keys(a)
    if not a.startswith("}"):
        # One scope, one cluster slot: its script never crosses slots.
        assert len({key_slot(k.encode()) for k in backend.keys(a)}) == 1


async def test_scopes_built_to_collide_keep_separate_counts(
    redis_url: str, clock: FakeClock
) -> None:
    victims = [
        "end_user:a",
        "end_user:a}:window",
        "end_user:{a}",
        "end_user:a:requests",
        "{end_user:a",
    ]
    async with TieredLimiter(redis_url, sync_interval=30, clock=clock) as lim:
        for i, scope in enumerate(victims):
            for _ in range(i + 1):
                assert (await lim.acquire(scope, rpm=100)).allowed
        await lim.sync()
    async with TieredLimiter(redis_url, sync_interval=30, clock=clock) as fresh:
        for i, scope in enumerate(victims):
            decision = await fresh.acquire(scope, rpm=100)
            assert decision.remaining == 100 - (i + 2), scope


def test_many_threads_admit_exactly_the_limit() -> None:
    table = _native.Table(1000, 4)
    scopes = [f"user:t-{i}" for i in range(4)]
    now = START + 1.0
    limit, threads, attempts = 5_000, 16, 2_000
    for s in scopes:
        # Redis leased this process the whole limit: every admission spends it, locally.
        table.apply(s, START, limit, 0, now, 60, limit, 0)
    admitted = [0] * threads
    barrier = threading.Barrier(threads)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(attempts):
            s = scopes[(n + i) % len(scopes)]
            if table.check_one(s, limit, 0, 0, now, 60, 1)[0] == _native.ADMITTED:
                admitted[n] += 1
            if i % 97 == 0:
                table.record(s, 3, now, 60)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    drained = {s: (r, t) for s, _, r, t, *_ in table.drain(now, 60, 1)}
    assert sum(admitted) == len(scopes) * limit
    # The requests were all paid for by the leases; only the token corrections are pushed.
    assert sum(r for r, _ in drained.values()) == 0
    assert sum(t for _, t in drained.values()) == 3 * threads * math.ceil(attempts / 97)


def test_many_threads_through_the_limiter_count_exactly() -> None:
    clock = FakeClock()
    lim = TieredLimiter(None, window=60, clock=clock)
    threads, attempts, limit = 8, 1_000, 3_000
    admitted = [0] * threads
    barrier = threading.Barrier(threads)

    def worker(n: int) -> None:
        barrier.wait()
        for _ in range(attempts):
            decision = lim.try_acquire("api_key:shared", rpm=limit, tpm=10**6, tokens=2)
            assert decision is not None
            admitted[n] += decision.allowed

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert sum(admitted) == limit
    decision = lim.try_acquire("api_key:shared", rpm=limit + 1, tpm=10**6)
    assert decision is not None
    assert decision.remaining == 0
    assert decision.remaining_tokens == 10**6 - 2 * limit
