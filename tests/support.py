"""Real servers for the tests, from the package's own throwaway-server helper."""

from tiered_limiter._server import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
