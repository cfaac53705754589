"""A small, obviously-correct Python model of the native table, for property tests.

It follows the rules documented in `tiered_limiter/_native.pyi` and `docs/design.md` with plain
dicts and no concern for memory or threads. The property tests run the same operations on it
and on the Rust table and compare every answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ADMITTED, DENIED, LOAD, EXACT = 0, 1, 2, 3


@dataclass
class Record:
    name: str
    pend_req: int = 0
    pend_tok: int = 0
    rate_req: int = 0
    rate_tok: int = 0
    own_req: int = 0
    own_tok: int = 0
    fresh: bool = False
    touched: bool = False


@dataclass
class Entry:
    window_start: int
    g_req: int = 0
    g_tok: int = 0
    record: Record | None = None


class ReferenceTable:
    def __init__(self, max_scopes: int, shards: int = 64) -> None:
        self.max_scopes = max_scopes
        self.entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def check_one(
        self,
        scope: str,
        rpm: int,
        tpm: int,
        tokens: int,
        now: float,
        window: int,
        proxies: int,
        offline: bool = False,
    ) -> tuple[int, int, int, int, float]:
        return self.check([scope], [rpm], [tpm], tokens, now, window, proxies, offline)

    def check(
        self,
        scopes: Sequence[str],
        rpm: Sequence[int],
        tpm: Sequence[int],
        tokens: int,
        now: float,
        window: int,
        proxies: int,
        offline: bool = False,
    ) -> tuple[int, int, int, int, float]:
        verdicts = []
        for i, scope in enumerate(scopes):
            entry = self.entries.get(scope)
            if offline and entry is None:
                entry = self.entries[scope] = Entry(math.floor(now))
            elif offline and now >= entry.window_start + window:
                # A local window, as while Redis is unreachable; the record's flags stay.
                entry.window_start, entry.g_req, entry.g_tok = math.floor(now), 0, 0
                if entry.record is not None:
                    old = entry.record
                    entry.record = Record(old.name, fresh=old.fresh, touched=old.touched)
            verdicts.append(
                self._verdict(entry, rpm[i], tpm[i], tokens, now, window, proxies, offline)
            )
        for outcome in (DENIED, LOAD, EXACT):
            for i, (v, retry) in enumerate(verdicts):
                if v == outcome:
                    return (outcome, i, -1, -1, retry if outcome == DENIED else 0.0)

        rem_r, rem_t = [], []
        for i, scope in enumerate(scopes):
            entry = self.entries[scope]
            rec = entry.record or Record(scope)
            entry.record = rec
            rec.pend_req += 1
            rec.pend_tok += tokens
            rec.touched = True
            if rpm[i]:
                rem_r.append(rpm[i] - entry.g_req - rec.pend_req)
            if tpm[i]:
                rem_t.append(tpm[i] - entry.g_tok - rec.pend_tok)
        return (ADMITTED, -1, min(rem_r, default=-1), min(rem_t, default=-1), 0.0)

    @staticmethod
    def _verdict(
        entry: Entry | None,
        rpm: int,
        tpm: int,
        tokens: int,
        now: float,
        window: int,
        proxies: int,
        offline: bool,
    ) -> tuple[int, float]:
        if entry is None or now >= entry.window_start + window:
            return LOAD, 0.0
        rec = entry.record
        pend_r = rec.pend_req if rec else 0
        pend_t = rec.pend_tok if rec else 0
        retry = entry.window_start + window - now
        if rpm and entry.g_req + pend_r + 1 > rpm:
            return DENIED, retry
        if tpm and entry.g_tok + pend_t + max(tokens, 1) > tpm:
            return DENIED, retry
        stale = rec is None or not rec.fresh
        if not offline and stale and rec is not None and rec.pend_req != 0:
            return LOAD, 0.0
        fleet_r = max(rec.rate_req, proxies * rec.own_req) if rec else 0
        fleet_t = max(rec.rate_tok, proxies * rec.own_tok) if rec else 0
        for limit, g, pend, cost, rate in (
            (rpm, entry.g_req, pend_r, 1, fleet_r),
            (tpm, entry.g_tok, pend_t, tokens, fleet_t),
        ):
            if not limit:
                continue
            remaining = limit - g
            share = remaining // proxies
            near = not offline and remaining <= 2 * rate
            if near or pend + cost > share:
                return (DENIED, retry) if offline else (EXACT, 0.0)
        return ADMITTED, 0.0

    def apply(
        self, scope: str, window_start: int, requests: int, tokens: int, now: float, window: int
    ) -> bool:
        entry = self.entries.get(scope)
        if entry is None:
            if len(self.entries) >= self.max_scopes and not self._evict_one(now, window):
                return False
            entry = self.entries[scope] = Entry(window_start)
            entry.g_req, entry.g_tok = requests, tokens
            entry.record = Record(scope)
        elif window_start == entry.window_start:
            rec = entry.record or Record(scope)
            rec.rate_req = max(0, requests - entry.g_req)
            rec.rate_tok = max(0, tokens - entry.g_tok)
            entry.g_req, entry.g_tok = requests, tokens
            entry.record = rec
        elif now >= window_start + window:
            return True  # a reply about a window that has ended is stale
        else:
            # Redis's open window wins; pending deltas survive unless their window ended.
            ended = now >= entry.window_start + window
            entry.window_start, entry.g_req, entry.g_tok = window_start, requests, tokens
            rec = entry.record or Record(scope)
            rec.rate_req = rec.rate_tok = 0
            if ended:
                rec.pend_req = rec.pend_tok = rec.own_req = rec.own_tok = 0
            entry.record = rec
        assert entry.record is not None
        entry.record.fresh = True
        return True

    def _evict_one(self, now: float, window: int) -> bool:
        for scope, entry in self.entries.items():
            if entry.record is None:
                del self.entries[scope]
                return True
        return False

    def drain(self) -> list[tuple[str, int, int, int]]:
        out = []
        for scope, entry in self.entries.items():
            rec = entry.record
            if rec is None:
                continue
            rec.own_req, rec.own_tok = max(rec.pend_req, 0), max(rec.pend_tok, 0)
            if rec.pend_req or rec.pend_tok:
                out.append((scope, entry.window_start, rec.pend_req, rec.pend_tok))
            elif not rec.touched:
                entry.record = None
                continue
            rec.pend_req = rec.pend_tok = 0
            rec.touched = False
        return out

    def take(self, scope: str) -> tuple[int, int, int] | None:
        entry = self.entries.get(scope)
        if entry is None or entry.record is None:
            return None
        rec = entry.record
        out = (entry.window_start, rec.pend_req, rec.pend_tok)
        rec.pend_req = rec.pend_tok = 0
        return out

    def restore(
        self, scope: str, window_start: int, requests: int, tokens: int, now: float, window: int
    ) -> bool:
        entry = self.entries.get(scope)
        if entry is None or entry.window_start != window_start or now >= window_start + window:
            return False
        rec = entry.record or Record(scope)
        entry.record = rec
        rec.pend_req += requests
        rec.pend_tok += tokens
        rec.touched = True
        return True

    def record(self, scope: str, tokens: int, now: float, window: int) -> bool:
        entry = self.entries.get(scope)
        if entry is None or now >= entry.window_start + window:
            return False
        rec = entry.record or Record(scope)
        entry.record = rec
        rec.pend_tok += tokens
        rec.touched = True
        return True

    def evict(self, now: float, window: int, budget: int) -> int:
        gone = [
            s
            for s, e in self.entries.items()
            if e.record is None and now >= e.window_start + window
        ][:budget]
        for s in gone:
            del self.entries[s]
        return len(gone)

    def stats(self) -> dict[str, int]:
        active = [e.record for e in self.entries.values() if e.record is not None]
        return {
            "scopes": len(self.entries),
            "active": len(active),
            "memory_bytes": 0,
            "evictions": 0,
            "rejected": 0,
            "pending": sum(1 for r in active if r.pend_req or r.pend_tok),
        }
