"""LiteLLM's v3 limiter with the tier behind its `RateLimitStore`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from litellm._redis import get_redis_async_client
from litellm.proxy._types import UserAPIKeyAuth
from litellm.proxy.hooks.parallel_request_limiter_v3 import (
    _PROXY_MaxParallelRequestsHandler_v3,
    fail_closed_rate_limit_enforcement_enabled,
)
from litellm.redis.stores.connection import connect
from litellm.redis.stores.rate_limits import RateLimitStore
from litellm.types.passthrough_endpoints.pass_through_endpoints import EndpointType

from .. import TieredLimiter
from .._redis import one_retry
from . import _settings
from ._handle import REQUEST, RequestLimits, TieredRateLimits, TieredRateLimitStore

logger = logging.getLogger(__name__)


def _general_settings() -> Mapping[str, Any]:
    # The proxy has imported its server module by the time it builds its hooks; importing it
    # when this module loads would start LiteLLM's whole proxy setup in any process.
    from litellm.proxy import proxy_server  # noqa: PLC0415

    return proxy_server.general_settings or {}


def _tier_client(redis_cache: Any) -> Any:
    """A redis-py asyncio client on the same Redis as LiteLLM's coordination cache, with the
    tier's retry policy (`one_retry`: the tier's scripts must not run twice)."""
    client = get_redis_async_client(**redis_cache.redis_kwargs)
    client.set_retry(one_retry())
    return client


class TieredParallelRequestHandler(_PROXY_MaxParallelRequestsHandler_v3):
    """`_PROXY_MaxParallelRequestsHandler_v3` whose window counters live in the tier.

    It subclasses LiteLLM's handler because the proxy finds its limiter by `isinstance`, and
    it re-declares `async_pre_call_hook` because the proxy calls only the pre-call hooks a
    class declares in its own body.
    """

    handles: list[TieredRateLimits] = []  # noqa: RUF012  # every worker's handle, for shutdown

    def __init__(self, internal_usage_cache: Any, **kwargs: Any) -> None:
        general = _general_settings()
        self.tier_settings = _settings.load(general)
        redis_cache = internal_usage_cache.dual_cache.redis_cache
        native = connect(redis_cache).rate_limits(
            internal_usage_cache.dual_cache.default_in_memory_ttl
        )
        self.tier: TieredRateLimits | None = None
        if (
            self.tier_settings.enabled
            and redis_cache is not None
            and "rate_limit_store" not in kwargs
        ):
            limiter = TieredLimiter(
                _tier_client(redis_cache),
                sync_interval=self.tier_settings.sync_interval,
                lease_horizon=self.tier_settings.lease_horizon,
                window=self.tier_settings.window,
                max_scopes=self.tier_settings.max_scopes,
                namespace=redis_cache.namespace or "",
                redis_timeout=self.tier_settings.redis_timeout,
                sync_timeout=self.tier_settings.sync_timeout,
                # Under fail-closed enforcement an outage-policy answer becomes LiteLLM's 503;
                # "deny" makes sure it charged nothing first.
                on_redis_down=(
                    "deny"
                    if fail_closed_rate_limit_enforcement_enabled(general)
                    else self.tier_settings.on_redis_down
                ),
            )
            self.tier = TieredRateLimits(
                native,
                limiter,
                self.tier_settings,
                fail_closed=lambda: fail_closed_rate_limit_enforcement_enabled(_general_settings()),
            )
            TieredParallelRequestHandler.handles.append(self.tier)
            self.tier.start_soon()
            kwargs["rate_limit_store"] = TieredRateLimitStore(self.tier)
        elif self.tier_settings.enabled and redis_cache is None:
            logger.info("tiered_limiter: no coordination Redis; LiteLLM's own limiter serves")
        kwargs.setdefault("rate_limit_store", RateLimitStore(native))
        super().__init__(internal_usage_cache, **kwargs)

    async def async_pre_call_hook(
        self,
        user_api_key_dict: UserAPIKeyAuth,
        cache: Any,
        data: dict,  # type: ignore[type-arg]
        call_type: str,
        endpoint_type: EndpointType = EndpointType.GENERIC,
    ) -> Any:
        """LiteLLM's pre-call check, with this request's route (tier or not) set first."""
        takes_tier = self.tier is not None and self.tier_settings.takes_tier(
            user_api_key_dict.api_key
        )
        REQUEST.set(RequestLimits(tier=takes_tier))
        return await super().async_pre_call_hook(
            user_api_key_dict=user_api_key_dict,
            cache=cache,
            data=data,
            call_type=call_type,
            endpoint_type=endpoint_type,
        )

    def _collect_windowed_keys_and_gauges(
        self, descriptors: Sequence[Any], skip_tpm_check: bool
    ) -> Any:
        """LiteLLM's split of descriptors, also handing each scope's limits to the handle."""
        request = REQUEST.get()
        if request is not None and request.tier:
            for descriptor in descriptors:
                rate_limit = descriptor.get("rate_limit") or {}
                window = int(rate_limit.get("window_size") or self.window_size)
                rpm = rate_limit.get("requests_per_unit")
                tpm = rate_limit.get("tokens_per_unit")
                request.limits[f"{descriptor['key']}:{descriptor['value']}"] = (
                    None if rpm is None else int(rpm),
                    None if tpm is None else int(tpm),
                    window,
                )
        return super()._collect_windowed_keys_and_gauges(descriptors, skip_tpm_check)
