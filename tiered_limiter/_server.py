"""A throwaway redis-server on a free loopback port, for the demo, tests and benchmarks."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import redis


def free_port(maximum: int = 65535) -> int:
    """A TCP port on 127.0.0.1, at most `maximum`, that nothing listens on right now."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= maximum:
            return port
    raise OSError(f"found no free loopback port at or below {maximum}")


class RedisServer:
    """One redis-server process on loopback, with no persistence.

    Args:
        *extra: More `redis-server` arguments, e.g. `"--requirepass", "secret"`.
        port: The port to listen on; a free one by default. Kept across `stop` and `start`,
            so a restarted server is reachable at the same URL.
        tls: Listen on `port` with TLS only (`--tls-port`, `--port 0`); `extra` names the
            certificate files. `url` is then `rediss://`.
        client_options: Keyword arguments of `redis.Redis` for the clients this helper opens
            (the readiness check and `client()`): credentials, `ssl_ca_certs`.
    """

    def __init__(
        self,
        *extra: str,
        port: int | None = None,
        tls: bool = False,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError(
                "redis-server is not installed: install it from your system's packages "
                "(e.g. 'apt-get install redis-server'), or run 'make test', which does"
            )
        self.binary = binary
        self.port = port or free_port()
        self.extra = extra
        self.tls = tls
        self.client_options = dict(client_options or {})
        self.dir = Path(tempfile.mkdtemp(prefix="tl-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and return once it answers PING."""
        ports = (
            ["--port", "0", "--tls-port", str(self.port)]
            if self.tls
            else ["--port", str(self.port)]
        )
        args = [self.binary, *ports, "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir)]
        args += ["--logfile", str(self.dir / "redis.log"), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        deadline = time.monotonic() + timeout
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, **self._auth()
        )
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        return self
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited; see {self.dir / 'redis.log'}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server did not answer within {timeout} s")
                time.sleep(0.02)  # polling a server that is still starting
        finally:
            client.close()

    def _auth(self) -> dict[str, Any]:
        options: dict[str, Any] = {"ssl": True} if self.tls else {}
        if "--requirepass" in self.extra:
            options["password"] = self.extra[self.extra.index("--requirepass") + 1]
        return options | self.client_options

    def stop(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self) -> redis.Redis:
        """A synchronous client that decodes replies to str."""
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, **self._auth())

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)


class RedisClusterServers:
    """A Redis Cluster of `masters` primaries on loopback, no replicas, for tests.

    Raises:
        FileNotFoundError: redis-cli (which creates the cluster) is not installed.
    """

    def __init__(self, masters: int = 3) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli is not installed (it comes with redis-server)")
        self.cli = cli
        self.nodes = [
            # A node's bus listens 10000 ports above it, so the node's port must leave room.
            RedisServer(
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                port=free_port(maximum=55535),
            )
            for _ in range(masters)
        ]

    @property
    def startup(self) -> tuple[str, int]:
        return ("127.0.0.1", self.nodes[0].port)

    def __enter__(self) -> RedisClusterServers:
        for node in self.nodes:
            node.extra = (*node.extra, "--cluster-config-file", str(node.dir / "nodes.conf"))
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(  # noqa: S603
            [self.cli, "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        client = redis.Redis(port=self.nodes[0].port, decode_responses=True)
        try:
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise TimeoutError("the cluster did not reach state ok within 30 s")
                time.sleep(0.05)  # polling the cluster's own state while slots propagate
        finally:
            client.close()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for node in self.nodes:
            node.__exit__(exc_type, exc, tb)
