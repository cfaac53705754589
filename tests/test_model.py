"""The limiter without Redis, checked against a small reference model with hypothesis."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_limiter import Limit, TieredLimiter

from .conftest import FakeClock

WINDOW = 10
SCOPES = ["api_key:a", "user:b", "team:c"]


@dataclass
class Window:
    start: int = 0
    requests: int = 0
    tokens: int = 0


@dataclass
class Model:
    """LiteLLM's fixed window per scope, counted exactly, all or nothing across scopes."""

    windows: dict[str, Window] = field(default_factory=dict)

    def acquire(self, now: float, limits: list[tuple[str, int, int]], tokens: int) -> bool:
        for scope, _, _ in limits:
            w = self.windows.get(scope)
            if w is None or now >= w.start + WINDOW:
                self.windows[scope] = Window(math.floor(now))
        for scope, rpm, tpm in limits:
            w = self.windows[scope]
            if rpm and w.requests + 1 > rpm:
                return False
            if tpm and w.tokens + max(tokens, 1) > tpm:
                return False
        for scope, _, _ in limits:
            self.windows[scope].requests += 1
            self.windows[scope].tokens += tokens
        return True

    def record(self, now: float, scope: str, tokens: int) -> None:
        w = self.windows.get(scope)
        if w is not None and now < w.start + WINDOW:
            w.tokens += tokens


limit_st = st.one_of(st.none(), st.integers(1, 6))
request_st = st.tuples(
    st.lists(
        st.tuples(st.sampled_from(SCOPES), limit_st, st.one_of(st.none(), st.integers(1, 40))),
        min_size=1,
        max_size=3,
        unique_by=lambda t: t[0],
    ),
    st.integers(0, 15),
)
op_st = st.one_of(
    st.tuples(st.just("acquire"), request_st),
    st.tuples(st.just("advance"), st.floats(0.0, 7.0)),
    st.tuples(st.just("record"), st.tuples(st.sampled_from(SCOPES), st.integers(0, 10))),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=60))
def test_matches_the_reference_model_without_redis(ops: list[tuple[str, object]]) -> None:
    asyncio.run(_run(ops))


async def _run(ops: list[tuple[str, object]]) -> None:
    clock = FakeClock()
    model = Model()
    async with TieredLimiter(None, window=WINDOW, sync_interval=1.0, clock=clock) as lim:
        for kind, arg in ops:
            if kind == "advance":
                clock.advance(arg)  # type: ignore[arg-type]
            elif kind == "record":
                scope, tokens = arg  # type: ignore[misc]
                lim.record(scope, tokens=tokens)
                model.record(clock.now, scope, tokens)
            else:
                limits, tokens = arg  # type: ignore[misc]
                expected = model.acquire(
                    clock.now, [(s, r or 0, t or 0) for s, r, t in limits], tokens
                )
                decision = await lim.acquire_many(
                    [Limit(s, r, t) for s, r, t in limits], tokens=tokens
                )
                assert decision.allowed == expected, (limits, tokens, model.windows)
