"""Several processes, one Redis, one limit: together they admit exactly the limit."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
import traceback

import pytest

from tiered_limiter import TieredLimiter

LIMIT = 100
PER_PROCESS = 60
QUIET = 0.5  # ten sync intervals
WATCHDOG = 50.0  # seconds after which a worker prints where it is
SCOPE = "api_key:" + "cd" * 32


async def _watchdog(after: float) -> None:
    """Print every task's stack if the process is still running after `after` seconds, so that
    a run that hangs says where."""
    await asyncio.sleep(after)  # a deadline, not a wait on state
    print(f"test_fleet worker still running after {after} s; its tasks:", file=sys.stderr)
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)


def _proxy(url: str, procs: int, ready: mp.Barrier, results: mp.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> int:
        watchdog = asyncio.create_task(_watchdog(WATCHDOG))
        try:
            return await counted()
        finally:
            watchdog.cancel()

    async def counted() -> int:
        async with TieredLimiter(url, sync_interval=0.05, window=60, redis_timeout=2.0) as lim:
            deadline = time.monotonic() + 20
            while lim.stats()["proxies"] < procs:
                if time.monotonic() > deadline:
                    raise TimeoutError("the other proxies never showed up in the heartbeat set")
                await asyncio.sleep(0.05)  # the sync task updates the count on its next run
            # In a thread, so that the sync task keeps beating the heart meanwhile.
            await asyncio.to_thread(ready.wait, 30)
            # Keep asking, as a proxy under steady load does, until denied for QUIET seconds:
            # by then every other proxy has spent or given back its lease, so a lease left
            # unspent cannot hide part of the limit. Bounded by PER_PROCESS admissions.
            admitted, denied_since = 0, None
            while admitted < PER_PROCESS:
                if (await lim.acquire(SCOPE, rpm=LIMIT)).allowed:
                    admitted, denied_since = admitted + 1, None
                elif denied_since is None:
                    denied_since = time.monotonic()
                elif time.monotonic() - denied_since > QUIET:
                    break
                await asyncio.sleep(0.001)  # a server's loop yields between requests
            return admitted

    try:
        results.put(asyncio.run(main()))
    except BaseException:
        results.put(traceback.format_exc())
        raise


@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 3])
def test_processes_sharing_one_redis_admit_exactly_the_limit(redis_url: str, procs: int) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(procs)
    results: mp.Queue[int] = ctx.Queue()  # type: ignore[type-arg]
    workers = [
        ctx.Process(target=_proxy, args=(redis_url, procs, ready, results)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    admitted = [results.get(timeout=90) for _ in workers]
    errors = [a for a in admitted if isinstance(a, str)]
    assert not errors, errors[0]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    assert procs * PER_PROCESS > LIMIT
    assert sum(admitted) == LIMIT, admitted
