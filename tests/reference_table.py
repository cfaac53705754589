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
    used_req: int = 0
    used_tok: int = 0
    lim_req: int = 0
    lim_tok: int = 0
    last_tokens: int = 0
    idle: int = 0
    fresh: bool = False
    touched: bool = False


@dataclass
class Entry:
    window_start: int
    g_req: int = 0
    g_tok: int = 0
    record: Record | None = None


def _settle(pend: int, want: int) -> tuple[int, int, int]:
    """(push, extra lease to ask for, new pending) for one kind at a drain."""
    push, held = (pend, 0) if pend > 0 else (0, -pend)
    if held > want:
        push -= held - want
        held = want
    return push, want - held, -held


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
                # A local window, as while Redis is unreachable.
                entry.window_start, entry.g_req, entry.g_tok = math.floor(now), 0, 0
                if entry.record is not None:
                    # Only the pending deltas go with the old window; the rest sizes leases.
                    entry.record.pend_req = entry.record.pend_tok = 0
            verdicts.append(
                self._verdict(entry, rpm[i], tpm[i], tokens, now, window, proxies, offline)
            )
        for outcome in (DENIED, LOAD, EXACT):
            for i, (v, retry, left_r, left_t) in enumerate(verdicts):
                if v == outcome:
                    return (outcome, i, left_r, left_t, retry if outcome == DENIED else 0.0)

        rem_r, rem_t = [], []
        for i, scope in enumerate(scopes):
            entry = self.entries[scope]
            rec = entry.record or Record(scope)
            entry.record = rec
            rec.pend_req += 1
            rec.pend_tok += tokens
            rec.used_req += 1
            rec.used_tok += tokens
            rec.lim_req = rpm[i]
            if tpm[i] or tokens:
                rec.lim_tok, rec.last_tokens = tpm[i], tokens
            rec.touched = True
            if rpm[i]:
                rem_r.append(rpm[i] - entry.g_req - rec.pend_req)
            if tpm[i]:
                rem_t.append(tpm[i] - entry.g_tok - rec.pend_tok)
        return (ADMITTED, -1, min(rem_r, default=-1), min(rem_t, default=-1), 0.0)

    @staticmethod
    def _verdict(  # noqa: PLR0911 (one return per rule, in the order docs/design.md gives them)
        entry: Entry | None,
        rpm: int,
        tpm: int,
        tokens: int,
        now: float,
        window: int,
        proxies: int,
        offline: bool,
    ) -> tuple[int, float, int, int]:
        """(outcome, retry, left requests, left tokens); what is left only when over a limit."""
        if entry is None or now >= entry.window_start + window:
            return LOAD, 0.0, -1, -1
        rec = entry.record
        pend_r = rec.pend_req if rec else 0
        pend_t = rec.pend_tok if rec else 0
        retry = entry.window_start + window - now
        over_r = rpm and entry.g_req + pend_r + 1 > rpm
        over_t = tpm and entry.g_tok + pend_t + max(tokens, 1) > tpm
        if over_r or over_t:
            left_r = max(0, rpm - entry.g_req - pend_r) if rpm else -1
            left_t = max(0, tpm - entry.g_tok - pend_t) if tpm else -1
            return DENIED, retry, left_r, left_t
        if offline:
            for limit, g, pend, cost in (
                (rpm, entry.g_req, pend_r, 1),
                (tpm, entry.g_tok, pend_t, tokens),
            ):
                if limit and pend + cost > (limit - g) // proxies:
                    return DENIED, retry, -1, -1
            return ADMITTED, 0.0, -1, -1
        if rec is None or not rec.fresh:
            if rec is not None and rec.pend_req != 0:
                return LOAD, 0.0, -1, -1
            return ADMITTED, 0.0, -1, -1
        if (rpm and pend_r + 1 > 0) or (tpm and pend_t + tokens > 0):
            return EXACT, 0.0, -1, -1
        return ADMITTED, 0.0, -1, -1

    def apply(
        self,
        scope: str,
        window_start: int,
        requests: int,
        tokens: int,
        now: float,
        window: int,
        lease_requests: int | None = None,
        lease_tokens: int | None = None,
    ) -> bool:
        entry = self.entries.get(scope)
        if entry is None:
            if len(self.entries) >= self.max_scopes and not self._evict_one(now, window):
                return False
            entry = self.entries[scope] = Entry(window_start)
        elif window_start != entry.window_start:
            if now >= window_start + window:
                return True  # a reply about a window that has ended is stale
            # Redis's open window wins; pending deltas survive unless their window ended.
            if now >= entry.window_start + window and entry.record is not None:
                entry.record.pend_req = entry.record.pend_tok = 0
            entry.window_start = window_start
        entry.g_req, entry.g_tok = requests, tokens
        rec = entry.record or Record(scope)
        entry.record = rec
        rec.pend_req -= lease_requests or 0
        rec.pend_tok -= lease_tokens or 0
        rec.fresh = True
        return True

    def _evict_one(self, now: float, window: int) -> bool:
        """Evict a scope with no record, else one whose record has nothing to push.

        Which one the native table picks depends on its layout; the property tests keep the
        table below its cap, and only check that something evictable is found.
        """
        for scope, entry in self.entries.items():
            if entry.record is None:
                del self.entries[scope]
                return True
        for scope, entry in self.entries.items():
            rec = entry.record
            if rec is not None and rec.pend_req <= 0 and rec.pend_tok <= 0:
                del self.entries[scope]
                return True
        return False

    def drain(self, now: float, window: int, idle_drains: int) -> list[tuple[object, ...]]:
        out: list[tuple[object, ...]] = []
        for scope, entry in self.entries.items():
            rec = entry.record
            if rec is None:
                continue
            if now >= entry.window_start + window:
                entry.record = None
                continue
            touched = rec.touched
            rec.idle = 0 if touched else rec.idle + 1
            rec.touched = False
            releasing = rec.idle >= idle_drains
            want_r = 0 if releasing or not rec.lim_req else 2 * max(rec.used_req, 0) + 1
            want_t = (
                0 if releasing or not rec.lim_tok else 2 * max(rec.used_tok, 0) + rec.last_tokens
            )
            rec.used_req = rec.used_tok = 0
            push_r, top_r, rec.pend_req = _settle(rec.pend_req, want_r)
            push_t, top_t, rec.pend_tok = _settle(rec.pend_tok, want_t)
            if touched or push_r or push_t or top_r or top_t:
                out.append(
                    (
                        scope,
                        entry.window_start,
                        push_r,
                        push_t,
                        top_r,
                        top_t,
                        rec.lim_req,
                        rec.lim_tok,
                    )
                )
            elif releasing:
                entry.record = None
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
        rec.used_tok += tokens  # a correction is use: it sizes the next token lease
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
