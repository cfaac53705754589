"""The adapter's knobs, fuzzed: any value from the environment or the proxy config either
starts the tier or is refused with an error naming the knob, before a limiter exists."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_limiter import InvalidArgumentError, InvalidTypeError, TieredLimiter
from tiered_limiter.litellm._settings import load

VARIABLES = [
    "TIERED_LIMITER",
    "TIERED_LIMITER_SYNC_INTERVAL",
    "TIERED_LIMITER_LEASE_HORIZON",
    "TIERED_LIMITER_MAX_SCOPES",
    "TIERED_LIMITER_REDIS_TIMEOUT",
    "TIERED_LIMITER_SYNC_TIMEOUT",
    "TIERED_LIMITER_ON_REDIS_DOWN",
    "LITELLM_RATE_LIMIT_WINDOW_SIZE",
]
KEYS = [
    "mode",
    "sync_interval",
    "lease_horizon",
    "max_scopes",
    "redis_timeout",
    "sync_timeout",
    "on_redis_down",
]
values = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["on", "off", "canary:25", "canary:101", "0.1", "-1", "nan", "inf", "1e400"]),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=800, deadline=None)
@given(
    st.dictionaries(st.sampled_from(VARIABLES), st.text(max_size=30), max_size=4),
    st.one_of(st.none(), st.dictionaries(st.sampled_from(KEYS), values, max_size=4), values),
)
def test_any_knob_value_starts_the_tier_or_is_refused_by_name(
    environ: dict[str, str], section: Any
) -> None:
    try:
        knobs = load({"tiered_limiter": section}, environ)
        TieredLimiter(
            None,
            sync_interval=knobs.sync_interval,
            lease_horizon=knobs.lease_horizon,
            window=knobs.window,
            max_scopes=knobs.max_scopes,
            redis_timeout=knobs.redis_timeout,
            sync_timeout=knobs.sync_timeout,
            on_redis_down=knobs.on_redis_down,
        )
    except (InvalidArgumentError, InvalidTypeError) as exc:
        message = str(exc)
        names = [*VARIABLES, *KEYS, "window", "general_settings.tiered_limiter"]
        assert any(name in message for name in names), message
        return
    assert 0 <= knobs.share <= 100


@pytest.mark.parametrize(
    ("environ", "section", "named"),
    [
        ({"TIERED_LIMITER_SYNC_INTERVAL": "fast"}, {}, "TIERED_LIMITER_SYNC_INTERVAL"),
        ({}, {"max_scopes": "lots"}, "general_settings.tiered_limiter.max_scopes"),
    ],
)
def test_a_bad_number_names_where_it_came_from(
    environ: dict[str, str], section: dict[str, str], named: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=named.replace(".", r"\.")):
        load({"tiered_limiter": section}, environ)
