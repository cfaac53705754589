"""RSS per tracked scope, in a fresh process for each count, against a plain Python dict.

Each child process fills a table with N scopes (`api_key:` + 64 hex characters, rpm and tpm
totals as a sync would apply them), drains twice so every scope is idle and synced, and reports
its RSS growth from /proc/self/statm. The dict baseline holds the same scopes as
`{scope: [window_start, requests, tokens]}`, the least a Python limiter keeps.

    .venv/bin/python bench/memory.py [--counts 1000 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import os, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
kind, n = sys.argv[1], int(sys.argv[2])
from tiered_limiter import _native
names = [f"api_key:{i:064x}" for i in range(n)]
before = rss()
if kind == "tier":
    t = _native.Table(max(n, 1), 64)
    for s in names:
        t.apply(s, 1_800_000_000, 5, 500, 1_800_000_001.0, 60)
    t.drain(); t.drain()
    extra = t.stats()["memory_bytes"]
else:
    d = {}
    for s in names:
        d[s] = [1_800_000_000, 5, 500]
    extra = 0
after = rss()
print(after - before, extra)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="*", default=[1000, 10_000, 100_000, 1_000_000])
    args = parser.parse_args()
    print(f"{'scopes':>9} {'tier B/scope':>13} {'table says':>11} {'dict B/scope':>13}")
    for n in args.counts:
        row = []
        for kind in ("tier", "dict"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, kind, str(n)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            ).stdout.split()
            row.append((int(out[0]) / n, int(out[1]) / n))
        print(f"{n:>9} {row[0][0]:>13.1f} {row[0][1]:>11.1f} {row[1][0]:>13.1f}")


if __name__ == "__main__":
    main()
