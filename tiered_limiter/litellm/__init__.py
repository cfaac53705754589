"""The LiteLLM adapter: LiteLLM's v3 rate limiter with its window counters in the tier.

Turn it on with one setting in the proxy's environment:

    LITELLM_WORKER_STARTUP_HOOKS=tiered_limiter.litellm:install

See docs/litellm.md for the knobs (`TIERED_LIMITER=off`, `TIERED_LIMITER=canary:25`, ...).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from ._settings import Settings, load, parse_mode

__all__ = ["Settings", "install", "load"]

logger = logging.getLogger(__name__)

_HOOK_NAME = "parallel_request_limiter"


def install() -> bool:
    """Put the tier behind LiteLLM's rate limiter in this worker; run before the proxy's hooks.

    Meant for `LITELLM_WORKER_STARTUP_HOOKS`, which runs it in every worker before the config
    is loaded. `TIERED_LIMITER=off` in the environment leaves LiteLLM untouched; the rest of
    the knobs are read when LiteLLM builds its limiter, once `general_settings` is loaded.

    Returns:
        Whether the limiter was swapped in.

    Raises:
        InvalidArgumentError: `TIERED_LIMITER` has a value other than on, off or canary:N.
    """
    if parse_mode(os.environ.get("TIERED_LIMITER", "on")) == 0:
        logger.info("tiered_limiter: TIERED_LIMITER=off, LiteLLM's own limiter serves")
        return False
    if os.environ.get("LEGACY_MULTI_INSTANCE_RATE_LIMITING", "").lower() == "true":
        logger.warning("tiered_limiter: LiteLLM's legacy limiter is selected; not installing")
        return False

    # litellm is an optional dependency: import it only when a proxy asks for the adapter.
    from litellm.proxy import proxy_server  # noqa: PLC0415
    from litellm.proxy.hooks import PROXY_HOOKS  # noqa: PLC0415

    from ._hook import TieredParallelRequestHandler  # noqa: PLC0415  # imports litellm

    PROXY_HOOKS[_HOOK_NAME] = TieredParallelRequestHandler
    _count_short_prompts_inline()
    original = proxy_server.proxy_shutdown_event
    if not getattr(original, "_tiered_limiter", False):
        proxy_server.proxy_shutdown_event = _closing(original)
    logger.info("tiered_limiter: installed as LiteLLM's %s", _HOOK_NAME)
    return True


# Below this many characters of message text, counting a prompt's tokens inline costs less
# than handing it to a worker thread (about 7 us against 90 us of CPU for a short prompt).
_INLINE_COUNT_CHARS = 4096


def _count_short_prompts_inline() -> None:
    """Let LiteLLM's limiter count the tokens of short prompts on the event loop.

    LiteLLM offloads every token estimate to a worker thread so that a long prompt does not
    stall the loop; for a short one the thread hop costs more CPU than the count itself, and
    with the Redis round trips gone it is most of what the limiter's hook still costs.
    """
    from litellm.proxy.hooks import parallel_request_limiter_v3 as v3  # noqa: PLC0415

    offload = v3.offload_token_count  # type: ignore[attr-defined]
    if getattr(offload, "_tiered_limiter", False):
        return

    def offload_long_only(function: Any) -> Any:
        offloaded = offload(function)

        async def count(*args: Any, **kwargs: Any) -> Any:
            if _short(kwargs.get("data")):
                return function(*args, **kwargs)
            return await offloaded(*args, **kwargs)

        return count

    offload_long_only._tiered_limiter = True  # type: ignore[attr-defined]
    v3.offload_token_count = offload_long_only  # type: ignore[attr-defined]


def _short(data: object) -> bool:
    """Whether a request's messages hold less than `_INLINE_COUNT_CHARS` of plain text."""
    if not isinstance(data, dict) or set(data) & {"tools", "functions", "input", "prompt"}:
        return False
    messages = data.get("messages")
    if not isinstance(messages, list) or len(messages) > 64:
        return False
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            return False
        total += len(content)
    return total < _INLINE_COUNT_CHARS


def _closing(shutdown: Any) -> Any:
    """The proxy's shutdown, followed by a flush of every pending delta to Redis."""

    @functools.wraps(shutdown)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ._hook import TieredParallelRequestHandler  # noqa: PLC0415  # imports litellm

        try:
            return await shutdown(*args, **kwargs)
        finally:
            for handle in TieredParallelRequestHandler.handles:
                try:
                    await handle.close()
                except Exception:
                    logger.exception("tiered_limiter: flushing pending deltas at shutdown failed")

    wrapper._tiered_limiter = True  # type: ignore[attr-defined]
    return wrapper
