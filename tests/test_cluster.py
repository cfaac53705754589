"""The limiter on a real three-primary Redis Cluster.

Batches are grouped by slot, one slot per script.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster

from tiered_limiter import Limit, TieredLimiter
from tiered_limiter._server import RedisClusterServers

from .conftest import FakeClock


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers(3) as servers:
        yield servers


@pytest.mark.slow
async def test_sync_and_exact_checks_work_across_slots(
    cluster: RedisClusterServers, clock: FakeClock
) -> None:
    host, port = cluster.startup
    client = RedisCluster(host=host, port=port, decode_responses=False)
    scopes = [f"user:u-{i}" for i in range(40)]
    try:
        await client.flushall()  # type: ignore[no-untyped-call]
        async with TieredLimiter(client, sync_interval=30, clock=clock) as lim:
            for scope in scopes:
                for _ in range(3):
                    assert (await lim.acquire(scope, rpm=100, tpm=1000, tokens=2)).allowed
        # Leaving gave every unspent lease back: Redis holds what was admitted.
        for scope in scopes:
            assert int(await client.get(f"{{{scope}}}:requests")) == 3
            assert float(await client.get(f"{{{scope}}}:tokens")) == 6

        async with TieredLimiter(client, sync_interval=30, clock=clock) as lim:
            # Two scopes in different slots: the team is at its limit, so neither is charged.
            assert (await lim.acquire("team:t-1", rpm=1)).allowed
            decision = await lim.acquire_many(
                [Limit("user:u-0", rpm=1000), Limit("team:t-1", rpm=1)]
            )
            assert not decision.allowed
        assert int(await client.get("{user:u-0}:requests")) == 3
        assert int(await client.get("{team:t-1}:requests")) == 1
    finally:
        await client.aclose()
