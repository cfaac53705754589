"""RSS per tracked scope, in a fresh process for each count, against a plain Python dict.

Each child process measures its own RSS (/proc/self/statm) before and after filling one
structure with N scopes (`api_key:` + 64 hex characters, charged with rpm and tpm limits),
so the figure is what the process really holds, allocator overhead and heap holes included:

- idle: a `Table` with the adapter's default `max_scopes` (1M). Scopes arrive
  `--per-sync` at a time (by default 2,000: what one sync round trip carries, 4 batches of
  500), each batch charged and then drained twice as the sync task would,
  so every scope ends idle and synced (no active record) and active records are reused
  between batches as in a running proxy;
- active: the same table with all N scopes charged and not drained, so every scope also
  holds an active record (its name and pending deltas) as it does between two syncs;
- dict: `{scope: [window_start, requests, tokens]}`, the least a Python limiter keeps; the
  scope strings are created inside the measurement and kept by the dict, as a limiter keyed
  by name must keep them (the table keeps no name for an idle scope).

`trimmed` is the idle figure after `gc.collect()` and glibc's `malloc_trim(0)`: what remains
once the heap that drained batches and Python garbage freed (and that glibc keeps for reuse,
a fixed cost of the batch size, not of each scope) is handed back. `table says` is the table's
own `memory_bytes` accounting. A table holds about 99.7% of its `max_scopes` before it starts
evicting (its shards fill unevenly), so a count above 90% of `--max-scopes` gets a table of
1.1x the count. The first row also gives the
fixed cost of a worker: RSS of a fresh interpreter after `import tiered_limiter` and of one
empty `TieredLimiter(None)`.

    .venv/bin/python bench/memory.py [--counts 1000 10000 100000 1000000] [--per-sync 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import os, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
kind, n, per_sync, max_scopes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start = rss()
import tiered_limiter
from tiered_limiter import _native
imported = rss()
LIMIT = 2**31 - 1
now = time.time()
if kind == "base":
    lim = tiered_limiter.TieredLimiter(None)
    print(imported - start, rss() - imported, 0)
    sys.exit()
if kind == "dict":
    before = rss()
    d = {}
    ws = int(now)
    for i in range(n):
        d[f"api_key:{i:064x}"] = [ws, 1, 10]
    print(rss() - before, 0, len(d), rss() - before)
    sys.exit()
before = rss()
t = _native.Table(max_scopes, 64)
step = n if kind == "active" else per_sync
for first in range(0, n, step):
    for i in range(first, min(first + step, n)):
        t.check_one(f"api_key:{i:064x}", LIMIT, LIMIT, 10, now, 60, 1, offline=True)
    if kind == "idle":
        t.drain(now, 60, 1)
        t.drain(now, 60, 1)
stats = t.stats()
assert stats["scopes"] == n, stats
assert stats["active"] == (n if kind == "active" else 0), stats
grown = rss() - before
# Heap that was freed (drained batches, Python garbage) but that glibc still holds: reused by
# later allocations, so a fixed cost of the sync batch, not of each scope.
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(grown, stats["memory_bytes"], stats["scopes"], rss() - before)
"""


def child(kind: str, n: int, per_sync: int, max_scopes: int) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(n), str(per_sync), str(max_scopes)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    ).stdout.split()
    return [int(x) for x in out]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="*", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--per-sync", type=int, default=2000, help="scopes charged per sync")
    parser.add_argument("--max-scopes", type=int, default=1_000_000)
    args = parser.parse_args()

    imported, limiter, *_ = child("base", 0, 1, args.max_scopes)
    print(
        f"worker: import tiered_limiter {imported / 2**20:.1f} MiB RSS, "
        f"an empty TieredLimiter {limiter / 2**10:.0f} KiB more"
    )
    print(
        f"max_scopes={args.max_scopes} (or 1.1x the scopes, if more), {args.per_sync} scopes "
        "per sync; RSS bytes per scope:"
    )
    print(
        f"{'scopes':>9} {'idle':>8} {'trimmed':>8} {'table says':>11} {'active':>8}"
        f" {'table says':>11} {'dict':>8}"
    )
    for n in args.counts:
        # Shards fill unevenly: a table holds about 99.7% of max_scopes before it evicts.
        max_scopes = max(args.max_scopes, n * 11 // 10)
        idle = child("idle", n, args.per_sync, max_scopes)
        active = child("active", n, args.per_sync, max_scopes)
        plain = child("dict", n, args.per_sync, 0)
        print(
            f"{n:>9} {idle[0] / n:>8.1f} {idle[3] / n:>8.1f} {idle[1] / n:>11.1f}"
            f" {active[0] / n:>8.1f} {active[1] / n:>11.1f} {plain[0] / n:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
