"""Real parts for the adapter's tests: a redis-server and `litellm` proxy processes.

Each proxy is a real `litellm --config ...` process on a free loopback port (started by
`integration.proxy`), with a `mock_response` model and `integration/proxy_auth.py` as its
`custom_auth` hook (limits per key from a JSON file, no database).
A test waits on the proxy's /health/liveliness, never on a sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from integration.proxy import MASTER_KEY, MOCK_TOKENS, Keys, Proxy, hashed, spawn, write_config

from ..support import RedisServer

__all__ = [
    "MASTER_KEY",
    "MOCK_TOKENS",
    "Keys",
    "Proxy",
    "StartProxy",
    "evalsha_calls",
    "hashed",
    "wait_for",
]

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_srv() -> Iterator[RedisServer]:
    """A redis-server of this test's own, so a test may stop and restart it."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rdb(redis_srv: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_srv.port, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys.json")


StartProxy = Callable[..., Proxy]


@pytest.fixture
def start_proxy(tmp_path: Path, redis_srv: RedisServer, keys: Keys) -> Iterator[StartProxy]:
    """Start proxies on this test's Redis: `start_proxy(tier=True, env={...}, general={...})`."""
    started: list[Proxy] = []

    def start(
        *,
        tier: bool = True,
        env: dict[str, str] | None = None,
        general: dict[str, Any] | None = None,
    ) -> Proxy:
        config = write_config(tmp_path, redis_srv.port, general)
        environ = {"TIERED_LIMITER_SYNC_INTERVAL": "0.05", **(env or {})}
        proxy = spawn(tmp_path, config, keys, tier=tier, env=environ)
        started.append(proxy)
        proxy.wait_healthy()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
    now: Callable[[], str] | None = None,
) -> None:
    """Poll `predicate` until it holds, at most `timeout` seconds; `now` says, on failure,
    what held instead."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            seen = f" ({now()})" if now is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{seen}")
        time.sleep(0.02)  # polling state another process changes


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval")
    )
