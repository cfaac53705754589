"""One real `litellm` proxy process: its config, its keys file, starting it and stopping it.

Shared by the fleet (`integration.fleet`) and the adapter's tests (`tests/litellm/conftest.py`).
Each proxy serves a `mock_response` model, so no provider is called, and authenticates with
`proxy_auth.py` (limits per key from a JSON file, no database).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tiered_limiter._server import free_port

HERE = Path(__file__).parent
REPO = HERE.parent
MASTER_KEY = "sk-master-0123456789abcdef0123456789abcdef"
STARTUP_TIMEOUT = 120.0
MOCK_TOKENS = 30  # what a `mock_response` of "hi" to one short message reports as total_tokens
TIER_HOOK = "tiered_limiter.litellm:install"


class Proxy:
    """One running `litellm` proxy."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30.0)

    def chat(self, key: str, *, model: str = "fake", user: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
        if user is not None:
            body["user"] = user
        return self.client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )

    def statuses(self, key: str, n: int, **kwargs: Any) -> list[int]:
        return [self.chat(key, **kwargs).status_code for _ in range(n)]

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.client.get("/health/liveliness", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling a process that is still starting
        raise TimeoutError(f"proxy not healthy within {timeout} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (the adapter flushes pending deltas on shutdown), then SIGKILL after 20 s."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Keys:
    """The keys file the proxies' `custom_auth` reads; add keys with their limits at any time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: dict[str, dict[str, Any]] = {}
        self._write()

    def add(self, key: str, **fields: Any) -> str:
        self.keys[key] = fields
        self._write()
        return key

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.keys))
        tmp.replace(self.path)


def write_config(
    directory: Path, redis_port: int | None, general: Mapping[str, Any] | None = None
) -> Path:
    """A proxy config in `directory` (with `proxy_auth.py` beside it); no Redis if no port."""
    shutil.copy(HERE / "proxy_auth.py", directory / "proxy_auth.py")
    settings: dict[str, Any] = {
        "master_key": MASTER_KEY,
        "custom_auth": "proxy_auth.user_api_key_auth",
        **(general or {}),
    }
    if redis_port is not None:
        settings["coordination_redis"] = {"host": "127.0.0.1", "port": redis_port}
    config = {
        "model_list": [
            {
                "model_name": "fake",
                "litellm_params": {
                    "model": "openai/fake",
                    "api_key": "sk-fake",
                    "mock_response": "hi",
                },
            }
        ],
        "general_settings": settings,
    }
    path = directory / f"config-{free_port()}.json"
    path.write_text(json.dumps(config))
    return path


def spawn(
    directory: Path,
    config: Path,
    keys: Keys,
    *,
    tier: bool = True,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    new_session: bool = False,
) -> Proxy:
    """Start `litellm --config config` on a free loopback port; call `wait_healthy()` next.

    Args:
        directory: Where the proxy runs and writes its log.
        config: From `write_config`.
        keys: The keys file its `custom_auth` reads.
        tier: Install the adapter (`LITELLM_WORKER_STARTUP_HOOKS`); False runs LiteLLM alone.
        env: More environment, over the defaults here (e.g. `LITELLM_RATE_LIMIT_WINDOW_SIZE`).
        port: The port; a free one by default.
        new_session: Detach from the caller's session, so the proxy outlives it (`fleet up`).
    """
    port = port or free_port()
    environ = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "TL_TEST_KEYS": str(keys.path),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    # LiteLLM 1.110.2 asks uvicorn for uvloop unless told otherwise, and uvloop comes only with
    # litellm[proxy], which does not install here: without it the proxy exits at startup.
    if importlib.util.find_spec("uvloop") is None:
        environ.setdefault("LITELLM_EVENT_LOOP", "asyncio")
    if tier:
        environ["LITELLM_WORKER_STARTUP_HOOKS"] = TIER_HOOK
    else:
        environ.pop("LITELLM_WORKER_STARTUP_HOOKS", None)
    log = directory / f"proxy-{port}.log"
    litellm_bin = Path(sys.executable).parent / "litellm"
    args = [str(litellm_bin), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=directory,
            start_new_session=new_session,
        )
    return Proxy(proc, port, log)


def hashed(key: str) -> str:
    """The api_key descriptor value LiteLLM uses: the SHA-256 hex of the raw key."""
    return hashlib.sha256(key.encode()).hexdigest()
