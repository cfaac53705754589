"""The adapter's knobs: environment first, then `general_settings.tiered_limiter`, then defaults."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .._errors import InvalidArgumentError

# (environment variable, general_settings key, default)
_KNOBS: dict[str, tuple[str, str, object]] = {
    "mode": ("TIERED_LIMITER", "mode", "on"),
    "sync_interval": ("TIERED_LIMITER_SYNC_INTERVAL", "sync_interval", 0.1),
    "lease_horizon": ("TIERED_LIMITER_LEASE_HORIZON", "lease_horizon", 10.0),
    "max_scopes": ("TIERED_LIMITER_MAX_SCOPES", "max_scopes", 1_000_000),
    "redis_timeout": ("TIERED_LIMITER_REDIS_TIMEOUT", "redis_timeout", 0.25),
    "sync_timeout": ("TIERED_LIMITER_SYNC_TIMEOUT", "sync_timeout", 2.0),
    "on_redis_down": ("TIERED_LIMITER_ON_REDIS_DOWN", "on_redis_down", "local"),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """What the adapter runs with.

    Attributes:
        share: Percent of API keys (0-100) whose requests take the tier; 100 is "on", 0 "off".
        sync_interval: Seconds between syncs with Redis.
        lease_horizon: Seconds of a scope's traffic a lease may cover, as
            `TieredLimiter(lease_horizon=...)`.
        max_scopes: Scopes tracked in memory per process.
        redis_timeout: The longest a request waits on Redis.
        sync_timeout: The longest a sync waits on Redis, as `TieredLimiter(sync_timeout=...)`.
        on_redis_down: "local", "allow" or "deny", as `TieredLimiter(on_redis_down=...)`.
        window: LiteLLM's window in seconds (`LITELLM_RATE_LIMIT_WINDOW_SIZE`).
    """

    share: int = 100
    sync_interval: float = 0.1
    lease_horizon: float = 10.0
    max_scopes: int = 1_000_000
    redis_timeout: float = 0.25
    sync_timeout: float = 2.0
    on_redis_down: str = "local"
    window: int = 60

    @property
    def enabled(self) -> bool:
        return self.share > 0

    def takes_tier(self, api_key: str | None) -> bool:
        """Whether requests of this (hashed) API key take the tier; stable for a key."""
        if self.share >= 100:
            return True
        if self.share <= 0 or not api_key:
            return False
        digest = hashlib.sha256(api_key.encode()).digest()
        return int.from_bytes(digest[:8], "big") % 100 < self.share


def parse_mode(value: object) -> int:
    """The share of keys for a mode: "on" is 100, "off" 0, "canary:N" N.

    Raises:
        InvalidArgumentError: The mode is none of those.
    """
    text = str(value).strip().lower()
    if text in ("on", "true", "1", ""):
        return 100
    if text in ("off", "false", "0"):
        return 0
    if text.startswith("canary:"):
        number = text.removeprefix("canary:").strip().rstrip("%")
        if number.isdigit() and 0 <= int(number) <= 100:
            return int(number)
    raise InvalidArgumentError(
        f"TIERED_LIMITER must be 'on', 'off' or 'canary:N' with N from 0 to 100, got {value!r}"
    )


def load(
    general_settings: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the knobs; an environment variable wins over `general_settings.tiered_limiter`.

    Raises:
        InvalidArgumentError: A knob has a value that cannot be used (the message names it).
    """
    env = os.environ if environ is None else environ
    section = (general_settings or {}).get("tiered_limiter") or {}
    if not isinstance(section, Mapping):
        raise InvalidArgumentError(
            f"general_settings.tiered_limiter must be a mapping, got {type(section).__name__}"
        )

    raw: dict[str, object] = {}
    where: dict[str, str] = {}
    for name, (variable, key, default) in _KNOBS.items():
        if variable in env:
            raw[name], where[name] = env[variable], variable
        else:
            raw[name] = section.get(key, default)
            where[name] = f"general_settings.tiered_limiter.{key}"
    raw["window"] = env.get("LITELLM_RATE_LIMIT_WINDOW_SIZE", "60")
    where["window"] = "LITELLM_RATE_LIMIT_WINDOW_SIZE"

    def number(name: str, kind: type[float] | type[int]) -> float:
        value = raw[name]
        try:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise TypeError
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgumentError(
                f"{where[name]} must be a number, got {value!r}"[:300]
            ) from None

    return Settings(
        share=parse_mode(raw["mode"]),
        sync_interval=number("sync_interval", float),
        lease_horizon=number("lease_horizon", float),
        max_scopes=int(number("max_scopes", int)),
        redis_timeout=number("redis_timeout", float),
        sync_timeout=number("sync_timeout", float),
        on_redis_down=str(raw["on_redis_down"]),
        window=int(number("window", int)),
    )
