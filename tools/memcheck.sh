#!/usr/bin/env bash
# Runs the native hot path (decide_one builds Decision tuples with unsafe FFI calls) under
# valgrind memcheck, beside a baseline that builds the same tuples in Python. CPython itself
# reports errors under valgrind; the check is that our code adds none and leaks nothing.
# Usage: tools/memcheck.sh   (needs valgrind; run by hand, takes about 30 s)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
run() {
  PYTHONMALLOC=malloc valgrind --leak-check=full --show-leak-kinds=definite "$PY" -c "$1" 2>&1 \
    | grep -E "ERROR SUMMARY|definitely lost" | sed 's/^==[0-9]*== *//'
}
native='
import gc
from tiered_limiter import TieredLimiter
lim = TieredLimiter(None, window=60)
out = [lim.try_acquire(f"api_key:{i % 7}", rpm=300, tpm=10_000, tokens=i % 50) for i in range(3000)]
assert all(type(d).__name__ == "Decision" for d in out)
gc.collect(); del out; gc.collect()'
python='
import gc
from tiered_limiter import TieredLimiter, Decision
lim = TieredLimiter(None, window=60)
out = [Decision(True, 3, 0.0, None, f"api_key:{i % 7}") for i in range(3000)]
gc.collect(); del out; gc.collect()'
echo "native hot path:"; run "$native"
echo "baseline (Python-built decisions):"; run "$python"
