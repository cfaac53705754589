"""The nginx fleet (`integration.fleet`): proxies with the tier hold every window near the limit.

Three LiteLLM proxies with the adapter behind nginx, one redis-server. Every number asserted
comes from the HTTP answers the load driver got and from what Redis held, sampled while the
load ran; nothing waits on a sleep (the fleet polls Redis until every proxy has reported itself).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.fleet import Fleet, skewed
from integration.load import Answer, RedisWatch, drive, windows

pytestmark = pytest.mark.slow

PROXIES = 3
LIMIT = 60
WINDOW = 10
WINDOWS = 2
# (offered load as a multiple of the limit, the nginx door's weights per proxy)
CASES = [(1.5, (1,) * PROXIES), (3.0, (1,) * PROXIES), (3.0, skewed(PROXIES, 0.7))]


@dataclass
class Run:
    load: float
    answers: list[Answer]
    starts: list[int]
    held: dict[int, int]


async def _load(fleet: Fleet, keys: list[str]) -> list[Run]:
    """Each key's load through its own door, all at once, with Redis sampled meanwhile."""
    seconds = WINDOWS * WINDOW + 1.5
    assert fleet.redis_url is not None
    async with RedisWatch(fleet.redis_url, keys) as watch:
        runs = [
            drive(
                door.url,
                [key],
                rate=load * LIMIT / WINDOW,
                count=round(load * LIMIT * seconds / WINDOW),
            )
            for door, key, (load, _) in zip(fleet.doors, keys, CASES, strict=True)
        ]
        answers = await asyncio.gather(*runs)
    return [
        Run(load, found, watch.starts(key), watch.held(key))
        for key, found, (load, _) in zip(keys, answers, CASES, strict=True)
    ]


def test_fleet_behind_nginx_admits_at_most_limit_plus_one_per_proxy(tmp_path: Path) -> None:
    """Offered 1.5x and 3x the limit, evenly and 70% to one proxy: in every complete window
    the fleet admits at least 97% of the limit and at most the limit plus one request per
    proxy, and Redis never holds more than that either."""
    doors = [weights for _, weights in CASES]
    with Fleet(PROXIES, limiter="tier", doors=doors, window=WINDOW, directory=tmp_path) as fleet:
        keys = [fleet.keys.add(f"sk-nginx-{i}", rpm_limit=LIMIT) for i in range(len(CASES))]
        runs = asyncio.run(_load(fleet, keys))
        upstreams = set(fleet.upstreams())

    for run in runs:
        assert {a.status for a in run.answers} <= {200, 429}, f"errors at {run.load}x"
        assert {a.upstream for a in run.answers} == upstreams, "nginx reached every proxy"
        found = windows(run.answers, window=WINDOW, limit=LIMIT, starts=run.starts)
        complete = [w for w in found if w.complete]
        assert len(complete) >= WINDOWS, (run.load, run.starts)
        for w in complete:
            context = (run.load, w, run.held.get(w.start))
            # The premise: the window was offered well over the limit. The driver sends on
            # schedule, but on a busy 2-core machine its sends bunch up across a window edge
            # (CI once saw 83 of the 90 scheduled at 1.5x), so ask for a margin, not the rate.
            assert w.offered >= 1.2 * LIMIT, context
            assert w.admitted <= LIMIT + PROXIES, context
            assert w.admitted >= 0.97 * LIMIT, context
            # Redis counts every admission, plus leases not yet spent or given back.
            assert w.admitted - PROXIES <= run.held[w.start] <= LIMIT + PROXIES, context
