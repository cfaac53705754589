"""A fleet on loopback: N LiteLLM proxies behind nginx, sharing one redis-server.

As a context manager (tests, benchmarks):

    with Fleet(3, limiter="tier", window=10) as fleet:
        key = fleet.keys.add("sk-a", rpm_limit=60)
        ...  # send requests to fleet.url, read Redis at fleet.redis_url

From a shell (`docs/fleet.md`):

    python -m integration.fleet up --proxies 3 --window 10          # until Ctrl-C or --hold
    python -m integration.fleet up --detach --dir /tmp/fleet        # in the background
    python -m integration.fleet down --dir /tmp/fleet
    python -m integration.fleet run --proxies 2 -- python -m integration.load --rpm 60 ...

`limiter` picks what enforces the limits: "tier" (the adapter, on Redis), "litellm" (LiteLLM's
own limiter on Redis) or "none" (no Redis: each proxy counts alone). nginx listens on one port
per *door*; each door balances over every proxy with its own weights and its own round-robin
state, so concurrent load streams through different doors do not disturb each other's split.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from tiered_limiter._server import RedisServer, free_port

from .proxy import Keys, Proxy, spawn, write_config

LIMITERS = ("tier", "litellm", "none")
STATE_FILE = "fleet.json"
# The sorted set where each proxy running the tier reports itself on every sync; members are
# `host:pid:random`.
HEARTBEATS = "{tiered_limiter:proxies}"
# A key with a limit no test reaches, for the requests that start a proxy's tier late.
WARMUP_KEY = "sk-fleet-warmup"
WARMUP_EVERY = 1.0
# How often a proxy or nginx is started again after losing its port to another process.
PORT_ATTEMPTS = 5
DEFAULT_HOLD = 3600.0


@dataclass(frozen=True, slots=True)
class Door:
    """One nginx port and the weights it gives each proxy, in proxy order."""

    port: int
    weights: tuple[int, ...]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def skewed(proxies: int, hot_share: float = 0.7) -> tuple[int, ...]:
    """Weights that send `hot_share` of the traffic to the first proxy and split the rest.

    For example 70% over 4 proxies is (21, 3, 3, 3): 21/30 to the first, 1/10 to each other.
    """
    if proxies == 1:
        return (1,)
    others = proxies - 1
    cold = 100 - round(hot_share * 100)
    hot = round(hot_share * 100) * others
    return (hot, *([cold] * others))


class Fleet:
    """Start N proxies, nginx in front of them and a redis-server; stop them all on exit.

    Args:
        proxies: How many LiteLLM proxies (one worker each).
        limiter: "tier", "litellm" or "none" (see the module's docstring).
        doors: Weights of each nginx port, one tuple per door; one evenly balanced by default.
        window: LiteLLM's window in seconds (`LITELLM_RATE_LIMIT_WINDOW_SIZE`); the tier uses it.
        env: More environment for every proxy, e.g. `{"TIERED_LIMITER_SYNC_INTERVAL": "0.1"}`.
        directory: Where configs and logs go; a new temporary directory (removed on exit) if None.
    """

    def __init__(
        self,
        proxies: int = 3,
        *,
        limiter: str = "tier",
        doors: Sequence[Sequence[int]] | None = None,
        window: int = 60,
        env: Mapping[str, str] | None = None,
        directory: Path | None = None,
    ) -> None:
        if limiter not in LIMITERS:
            raise ValueError(f"limiter must be one of {', '.join(LIMITERS)}, got {limiter!r}")
        if proxies < 1:
            raise ValueError(f"proxies must be at least 1, got {proxies}")
        weights = [tuple(int(w) for w in d) for d in (doors or [(1,) * proxies])]
        for w in weights:
            if len(w) != proxies or min(w) < 0 or max(w) == 0:
                raise ValueError(f"door weights {w} must be {proxies} numbers >= 0, one above 0")
        self.size = proxies
        self.limiter = limiter
        self.window = window
        self.env = dict(env or {})
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="tl-fleet-")) if directory is None else directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.doors = [Door(free_port(), w) for w in weights]
        self.keys = Keys(self.dir / "keys.json")
        self.redis: RedisServer | None = None
        self.proxies: list[Proxy] = []
        self.nginx: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The first door's URL: where clients send requests."""
        return self.doors[0].url

    @property
    def redis_url(self) -> str | None:
        return None if self.redis is None else self.redis.url

    def upstreams(self) -> dict[str, int]:
        """Proxy index by the `host:port` that nginx reports in `X-Fleet-Upstream`."""
        return {f"127.0.0.1:{p.port}": i for i, p in enumerate(self.proxies)}

    # Lifecycle

    def start(self) -> Fleet:
        """Start Redis, the proxies (in parallel) and nginx; return once all answer."""
        try:
            if self.limiter != "none":
                self.redis = RedisServer().start()
            redis_port = None if self.redis is None else self.redis.port
            config = write_config(self.dir, redis_port)
            env = {"LITELLM_RATE_LIMIT_WINDOW_SIZE": str(self.window), **self.env}
            self.proxies = [self._spawn(config, env) for _ in range(self.size)]
            for i in range(self.size):
                self.proxies[i] = self._healthy(self.proxies[i], config, env)
            if self.limiter == "tier":
                self._wait_heartbeats()
            self._start_nginx()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, config: Path, env: Mapping[str, str]) -> Proxy:
        return spawn(
            self.dir,
            config,
            self.keys,
            tier=self.limiter == "tier",
            env=env,
            # Ctrl-C reaches only this process, which stops the proxies in order.
            new_session=True,
        )

    def _healthy(self, proxy: Proxy, config: Path, env: Mapping[str, str]) -> Proxy:
        """Wait for `proxy` to answer; start it again on another port if another process took
        its port between choosing it and binding it (other test runs share the machine)."""
        for _ in range(PORT_ATTEMPTS - 1):
            try:
                proxy.wait_healthy()
            except RuntimeError:
                if "address already in use" not in proxy.tail().lower():
                    raise
                proxy.stop()
                proxy = self._spawn(config, env)
            else:
                return proxy
        proxy.wait_healthy()
        return proxy

    def _wait_heartbeats(self, timeout: float = 60.0) -> None:
        """Wait until every proxy has reported itself in Redis, so each one's first lease is
        sized for the whole fleet, and the tier (not LiteLLM's own limiter, which the adapter
        falls back on until the tier starts) serves from the first request of a measurement.

        A proxy whose tier could not reach Redis at startup (a busy machine can miss the
        adapter's 0.25 s Redis timeout) retries only when a request comes, so a proxy missing
        from the heartbeat set gets one warm-up request now and then, sent to it directly.
        """
        assert self.redis is not None
        client = self.redis.client()
        warmup = self.keys.add(WARMUP_KEY, rpm_limit=1_000_000_000)
        deadline = time.monotonic() + timeout
        next_warmup = time.monotonic() + WARMUP_EVERY
        try:
            while True:
                live = {_pid(m) for m in client.zrange(HEARTBEATS, 0, -1)}
                missing = [p for p in self.proxies if p.proc.pid not in live]
                if not missing:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{len(missing)} of {self.size} proxies never reported to Redis within"
                        f" {timeout} s; see {', '.join(str(p.log) for p in missing)}"
                    )
                if time.monotonic() >= next_warmup:
                    for proxy in missing:
                        with contextlib.suppress(httpx.HTTPError):
                            proxy.chat(warmup)
                    next_warmup = time.monotonic() + WARMUP_EVERY
                time.sleep(0.05)  # polling the proxies' sync tasks
        finally:
            client.close()

    def _start_nginx(self, timeout: float = 20.0) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise FileNotFoundError(
                "nginx is not installed: install it from your system's packages "
                "(e.g. 'apt-get install nginx'), or run 'make test', which does"
            )
        conf = self.dir / "nginx.conf"
        error_log = self.dir / "nginx-error.log"
        for attempt in range(PORT_ATTEMPTS):
            if attempt:
                # Another process took a door's port after it was chosen: choose again.
                self.doors = [Door(free_port(), d.weights) for d in self.doors]
            conf.write_text(self.nginx_config())
            error_log.unlink(missing_ok=True)
            self.nginx = subprocess.Popen(
                [binary, "-p", str(self.dir), "-c", str(conf), "-e", str(error_log)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            if self._nginx_answers(timeout):
                return
            log = error_log.read_text(errors="replace") if error_log.exists() else ""
            if "Address already in use" not in log:
                break
        raise RuntimeError(f"nginx exited; see {error_log}")

    def _nginx_answers(self, timeout: float) -> bool:
        """Whether every door answers; False if nginx exits first."""
        assert self.nginx is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            for door in self.doors:
                while True:
                    if self.nginx.poll() is not None:
                        return False
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{door.url}/health/liveliness").status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"nginx did not answer within {timeout} s")
                    time.sleep(0.05)  # polling a server that is still starting
        return True

    def nginx_config(self) -> str:
        """nginx's config: one worker, run as the current user, every path inside `dir`."""
        d = self.dir
        # nginx started by root hands its workers to `nobody` unless told otherwise.
        user = ""
        if os.geteuid() == 0:
            user = (
                f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
            )
        upstreams = []
        servers = []
        for i, door in enumerate(self.doors):
            members = "\n".join(
                f"        server 127.0.0.1:{p.port} weight={w};"
                for p, w in zip(self.proxies, door.weights, strict=True)
                if w > 0
            )
            upstreams.append(f"    upstream door{i} {{\n{members}\n        keepalive 32;\n    }}")
            servers.append(
                f"""    server {{
        listen 127.0.0.1:{door.port};
        location / {{
            proxy_pass http://door{i};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_read_timeout 60s;
            add_header X-Fleet-Upstream $upstream_addr always;
        }}
    }}"""
            )
        blocks = "\n".join(upstreams + servers)
        return f"""# Generated by integration/fleet.py for one fleet; every path is under {d}.
daemon off;
worker_processes 1;
{user}
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    log_format fleet '$msec $status $upstream_addr $request_time';
    access_log {d}/nginx-access.log fleet;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
{blocks}
}}
"""

    def stop(self) -> None:
        """Stop nginx, then the proxies (each flushes its pending deltas), then Redis."""
        if self.nginx is not None:
            if self.nginx.poll() is None:
                self.nginx.send_signal(signal.SIGQUIT)
                try:
                    self.nginx.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.nginx.kill()
                    self.nginx.wait(timeout=10)
            self.nginx = None
        for proxy in self.proxies:
            if proxy.proc.poll() is None:
                proxy.proc.send_signal(signal.SIGTERM)
        for proxy in self.proxies:
            proxy.stop()
        self.proxies = []
        if self.redis is not None:
            self.redis.stop()
            with contextlib.suppress(OSError):
                shutil.rmtree(self.redis.dir)
            self.redis = None

    def state(self) -> dict[str, object]:
        """What `up` prints and writes to `fleet.json`: where everything listens."""
        return {
            "pid": os.getpid(),
            "dir": str(self.dir),
            "limiter": self.limiter,
            "window": self.window,
            "doors": [{"url": d.url, "weights": list(d.weights)} for d in self.doors],
            "proxies": [p.url for p in self.proxies],
            "redis_url": self.redis_url,
            "keys_file": str(self.keys.path),
        }

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.dir)


def _pid(member: str) -> int | None:
    """The process id in a heartbeat member, `host:pid:random`."""
    parts = member.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def read_state(directory: Path) -> dict[str, object]:
    """The `fleet.json` a running `up` wrote in `directory`."""
    return json.loads((directory / STATE_FILE).read_text())  # type: ignore[no-any-return]


# The command line


def _fleet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proxies", type=int, default=3, help="LiteLLM proxies (default 3)")
    parser.add_argument("--limiter", choices=LIMITERS, default="tier")
    parser.add_argument(
        "--weights",
        action="append",
        default=None,
        help="a door's weights, comma-separated, e.g. 7,3 (repeat for more doors)",
    )
    parser.add_argument("--hot", type=float, help="one door sending this share to proxy 0")
    parser.add_argument("--window", type=int, default=60, help="window in seconds (default 60)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for every proxy")
    parser.add_argument("--dir", type=Path, help="configs and logs (default: a temp dir)")


def _build(args: argparse.Namespace) -> Fleet:
    doors: list[tuple[int, ...]] = []
    for text in args.weights or []:
        doors.append(tuple(int(w) for w in text.split(",")))
    if args.hot is not None:
        doors.append(skewed(args.proxies, args.hot))
    env = dict(item.split("=", 1) for item in args.env)
    return Fleet(
        args.proxies,
        limiter=args.limiter,
        doors=doors or None,
        window=args.window,
        env=env,
        directory=args.dir,
    )


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so `down` gets the same clean stop as Ctrl-C."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _up(args: argparse.Namespace) -> int:
    if args.detach:
        directory = args.dir or Path(tempfile.mkdtemp(prefix="tl-fleet-"))
        directory.mkdir(parents=True, exist_ok=True)
        (directory / STATE_FILE).unlink(missing_ok=True)
        argv = [a for a in sys.argv[1:] if a != "--detach"]
        if args.dir is None:
            argv += ["--dir", str(directory)]
        with (directory / "fleet.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "integration.fleet", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 300
        while not (directory / STATE_FILE).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                print((directory / "fleet.log").read_text(errors="replace"), file=sys.stderr)
                return 1
            time.sleep(0.2)  # polling the background fleet while it starts
        print(json.dumps(read_state(directory), indent=2))
        return 0

    with _terminated_as_interrupt(), _build(args) as fleet:
        state = json.dumps(fleet.state(), indent=2)
        tmp = fleet.dir / (STATE_FILE + ".tmp")
        tmp.write_text(state)
        tmp.replace(fleet.dir / STATE_FILE)
        print(state, flush=True)
        try:
            time.sleep(args.hold)
        except KeyboardInterrupt:
            pass
        finally:
            (fleet.dir / STATE_FILE).unlink(missing_ok=True)
    return 0


def _is_fleet(pid: int) -> bool:
    """Whether `pid` is still a running `integration.fleet` (a zombie has an empty cmdline)."""
    try:
        return b"integration.fleet" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _down(args: argparse.Namespace) -> int:
    try:
        state = read_state(args.dir)
    except FileNotFoundError:
        print(f"no running fleet in {args.dir}", file=sys.stderr)
        return 1
    pid = int(str(state["pid"]))
    if not _is_fleet(pid):
        print(
            f"process {pid} is not this fleet any more; removing the stale state", file=sys.stderr
        )
        (args.dir / STATE_FILE).unlink(missing_ok=True)
        return 1
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _is_fleet(pid):
        if time.monotonic() > deadline:
            print(f"fleet process {pid} did not stop within 60 s", file=sys.stderr)
            return 1
        time.sleep(0.1)  # polling another process while it stops its children
    print(f"stopped the fleet in {args.dir}")
    return 0


def _run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("run needs a command after --", file=sys.stderr)
        return 2
    with _build(args) as fleet:
        env = {
            **os.environ,
            "FLEET_URL": fleet.url,
            "FLEET_DIR": str(fleet.dir),
            "FLEET_KEYS": str(fleet.keys.path),
            "FLEET_REDIS_URL": fleet.redis_url or "",
        }
        (fleet.dir / STATE_FILE).write_text(json.dumps(fleet.state(), indent=2))
        return subprocess.run(command, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.fleet", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start a fleet and keep it up until Ctrl-C, --hold or down")
    _fleet_args(up)
    up.add_argument("--detach", action="store_true", help="run in the background; needs down")
    up.add_argument(
        "--hold", type=float, default=DEFAULT_HOLD, help="stop after this many seconds (3600)"
    )
    down = sub.add_parser("down", help="stop a fleet started with up --detach")
    down.add_argument("--dir", type=Path, required=True)
    run = sub.add_parser("run", help="start a fleet, run a command (FLEET_* in its env), stop")
    _fleet_args(run)
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.action == "up":
        return _up(args)
    if args.action == "down":
        return _down(args)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
