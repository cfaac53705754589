"""Checks of caller input, each raising before any counter changes."""

from __future__ import annotations

import math
from typing import Any

from ._errors import InvalidArgumentError, InvalidTypeError

MAX_SCOPE_BYTES = 1024
MAX_COUNT = 2**32 - 1


def scope(value: object, name: str = "scope") -> str:
    """Return `value` if it is a usable scope name, else raise naming it."""
    if type(value) is not str:
        # No repr of the value: a scope of the wrong type may still hold a whole key hash.
        raise InvalidTypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidArgumentError(f"{name} must not be empty")
    # str.isascii() is O(1) in CPython: ASCII scopes (nearly all) skip encoding.
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise InvalidArgumentError(
                f"{name} must be encodable as UTF-8; it holds a lone surrogate"
            ) from None
    if size > MAX_SCOPE_BYTES:
        raise InvalidArgumentError(
            f"{name} must be at most {MAX_SCOPE_BYTES} bytes in UTF-8, got {size} bytes "
            f"starting {value[:24]!r}"
        )
    return value


def limit(value: object, name: str) -> int:
    """Return a limit as an int, 0 for None (no limit); raise for anything unusable."""
    if value is None:
        return 0
    if type(value) is not int:
        raise InvalidTypeError(
            f"{name} must be an int or None, got {type(value).__name__} {value!r}"
        )
    if not 0 < value <= MAX_COUNT:
        raise InvalidArgumentError(f"{name} must be between 1 and {MAX_COUNT}, got {value}")
    return value


def tokens(value: object, name: str = "tokens", *, signed: bool = False) -> int:
    """Return a token count; negative only when `signed` (a correction after the call)."""
    if type(value) is not int:
        raise InvalidTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    low = -MAX_COUNT if signed else 0
    if not low <= value <= MAX_COUNT:
        raise InvalidArgumentError(f"{name} must be between {low} and {MAX_COUNT}, got {value}")
    return value


def requests(value: object) -> int:
    """Return the requests a check counts: 1, or 0 to charge tokens only."""
    if type(value) is not int:
        raise InvalidTypeError(f"requests must be an int, got {type(value).__name__} {value!r}")
    if value not in (0, 1):
        raise InvalidArgumentError(f"requests must be 0 or 1, got {value}")
    return value


# Bounds on every duration the limiter takes: a sync more often than every millisecond, or a
# timeout longer than a day, is a mistake, and the ratios derived from them must stay finite.
MIN_INTERVAL = 0.001
MAX_SECONDS = 86_400.0


def positive_seconds(value: object, name: str, *, minimum: float = 0.0) -> float:
    """Return a finite number of seconds above zero (at least `minimum`), at most a day."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(
            f"{name} must be a positive, finite number of seconds, got {value}"
        )
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum} seconds, got {value}")
    if value > MAX_SECONDS:
        raise InvalidArgumentError(f"{name} must be at most {MAX_SECONDS:.0f} seconds, got {value}")
    return float(value)


def positive_int(value: object, name: str, *, maximum: int = MAX_COUNT) -> int:
    """Return a whole number between 1 and `maximum`."""
    if type(value) is not int:
        raise InvalidTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 < value <= maximum:
        raise InvalidArgumentError(f"{name} must be between 1 and {maximum}, got {value}")
    return value


def choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    """Return `value` if it is one of `options`."""
    if value not in options:
        raise InvalidArgumentError(f"{name} must be one of {', '.join(options)}; got {value!r}")
    return str(value)
