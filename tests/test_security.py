"""Redis with an ACL user and password, and with TLS; no secret in logs, exceptions or stats()."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tiered_limiter import RedisUnavailableError, TieredLimiter

from .conftest import FakeClock
from .support import RedisServer, free_port

PASSWORD = "pw-0f3c9e1b7d"  # noqa: S105  # a throwaway server's password
HASH = "9c" * 32
KEY = f"api_key:{HASH}"
# Every command the tier sends, directly or from its scripts, and nothing else.
TIER_ACL = (
    "on",
    f">{PASSWORD}",
    "~*",
    "resetchannels",
    "-@all",
    "+ping",
    "+evalsha",
    "+script|load",
    "+get",
    "+set",
    "+del",
    "+incrby",
    "+incrbyfloat",
    "+mget",
    "+expire",
    "+time",
    "+zadd",
    "+zrem",
    "+zremrangebyscore",
    "+zcard",
)


def no_secret_in(caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    for text in [*logged, *texts]:
        assert PASSWORD not in text, text
        assert HASH not in text, text


@pytest.fixture
def acl_server() -> Iterator[RedisServer]:
    server = RedisServer(
        "--user",
        "default",
        "off",
        "--user",
        "tier",
        *TIER_ACL,
        "--user",
        "reader",
        "on",
        f">{PASSWORD}",
        "~*",
        "+@read",
        "+ping",
        client_options={"username": "tier", "password": PASSWORD},
    )
    with server:
        yield server


async def test_least_privilege_acl_user_runs_the_tier(
    acl_server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://tier:{PASSWORD}@127.0.0.1:{acl_server.port}/0"
    async with TieredLimiter(url, sync_interval=30, clock=clock) as lim:
        for _ in range(5):
            assert (await lim.acquire(KEY, rpm=100, tpm=1000, tokens=3)).allowed
        await lim.sync()
        stats = lim.stats()
    assert stats["redis_errors"] == 0
    assert acl_server.client().get(f"{{{KEY}}}:requests") == "5"
    no_secret_in(caplog, repr(stats))


async def test_user_without_permission_is_logged_once_and_counted(
    acl_server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://reader:{PASSWORD}@127.0.0.1:{acl_server.port}/0"
    async with TieredLimiter(url, sync_interval=30, clock=clock, on_redis_down="deny") as lim:
        decision = await lim.acquire(KEY, rpm=100)
        await lim.sync()
        await lim.sync()
        stats = lim.stats()
    assert not decision.allowed
    assert stats["redis_errors"] >= 3
    warnings = [r for r in caplog.records if "NoPermissionError" in r.getMessage()]
    assert len(warnings) == 1
    no_secret_in(caplog, repr(stats))


@pytest.mark.parametrize("user", ["tier", "nobody"])
async def test_wrong_password_raises_without_it(
    acl_server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture, user: str
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://{user}:{PASSWORD}x@127.0.0.1:{acl_server.port}/0"
    lim = TieredLimiter(url, clock=clock)
    with pytest.raises(RedisUnavailableError) as err:
        await lim.start()
    assert "refused this client's user or password: AuthenticationError" in str(err.value)
    no_secret_in(caplog, str(err.value), repr(err.value.__cause__))


async def test_requirepass_in_the_query_string_stays_out_of_logs(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with RedisServer("--requirepass", PASSWORD) as server:
        url = f"{server.url}?password={PASSWORD}"
        async with TieredLimiter(url, sync_interval=0.05, redis_timeout=0.2, clock=clock) as lim:
            assert (await lim.acquire(KEY, rpm=10)).allowed
            server.stop()
            await lim.sync()
            assert lim.stats()["degraded"]
            server.start()
            await lim.sync()
            stats = lim.stats()
    assert any("failed (ConnectionError)" in r.getMessage() for r in caplog.records)
    no_secret_in(caplog, repr(stats))


def _make_certs(d: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=tl-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext",
        "-out",
        "server.crt",
    )


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    _make_certs(d)
    server = RedisServer(
        "--tls-cert-file",
        str(d / "server.crt"),
        "--tls-key-file",
        str(d / "server.key"),
        "--tls-ca-cert-file",
        str(d / "ca.crt"),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        PASSWORD,
        port=free_port(),
        tls=True,
        client_options={"ssl_ca_certs": str(d / "ca.crt")},
    )
    try:
        server.start()
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS")
    try:
        yield server
    finally:
        server.__exit__(None, None, None)


async def test_tls_url_with_password(
    tls_server: RedisServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ca = tls_server.client_options["ssl_ca_certs"]
    url = f"rediss://:{PASSWORD}@127.0.0.1:{tls_server.port}/0?ssl_ca_certs={ca}"
    async with TieredLimiter(url, sync_interval=30, clock=clock) as lim:
        for _ in range(3):
            assert (await lim.acquire(KEY, rpm=10)).allowed
        await lim.sync()
        stats = lim.stats()
    client = tls_server.client()
    assert client.get(f"{{{KEY}}}:requests") == "3"
    client.close()
    no_secret_in(caplog, repr(stats))


async def test_tls_client_object(tls_server: RedisServer, clock: FakeClock) -> None:
    ca = tls_server.client_options["ssl_ca_certs"]
    client = Redis(
        host="127.0.0.1", port=tls_server.port, ssl=True, ssl_ca_certs=ca, password=PASSWORD
    )
    async with TieredLimiter(client, sync_interval=30, clock=clock) as lim:
        assert (await lim.acquire(KEY, rpm=10, tokens=4)).allowed
        await lim.sync()
    await client.aclose()


@pytest.mark.parametrize(
    "scheme",
    [
        "rediss",  # TLS without the CA: the server's certificate is not trusted
        "redis",  # plain text to a TLS port
    ],
)
async def test_a_tls_port_refuses_an_untrusted_or_plain_client_cleanly(
    tls_server: RedisServer, clock: FakeClock, scheme: str
) -> None:
    url = f"{scheme}://:{PASSWORD}@127.0.0.1:{tls_server.port}/0"
    with pytest.raises(RedisUnavailableError) as err:
        await TieredLimiter(url, clock=clock, redis_timeout=1.0, connect_timeout=1.0).start()
    assert PASSWORD not in str(err.value)
