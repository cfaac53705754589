"""Requests- and tokens-per-window limits for LLM gateways: in process, shared through Redis.

The whole public surface is listed in `__all__`; every other module is private.
"""

from ._errors import (
    InvalidArgumentError,
    InvalidTypeError,
    RedisUnavailableError,
    TieredLimiterError,
)
from ._limiter import Decision, Limit, TieredLimiter
from ._redis import one_retry

__all__ = [
    "Decision",
    "InvalidArgumentError",
    "InvalidTypeError",
    "Limit",
    "RedisUnavailableError",
    "TieredLimiter",
    "TieredLimiterError",
    "one_retry",
]
__version__ = "0.1.0"
