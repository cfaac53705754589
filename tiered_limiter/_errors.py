"""The exceptions the package raises."""


class TieredLimiterError(Exception):
    """Base class of every exception raised by tiered_limiter."""


class InvalidArgumentError(TieredLimiterError, ValueError):
    """An argument has the right type but a value the limiter cannot use."""


class InvalidTypeError(TieredLimiterError, TypeError):
    """An argument has a type the limiter does not accept."""


class RedisUnavailableError(TieredLimiterError, ConnectionError):
    """Redis could not be reached when the limiter started."""
