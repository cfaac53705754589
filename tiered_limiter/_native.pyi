"""The hot tier: a table of per-scope counters, written in Rust.

Every method is safe to call from several threads. None of them does I/O or waits; the sync
task in Python moves deltas between this table and Redis.

A scope is tracked by a keyed 64-bit hash of its name (the key is random per process), so the
table holds no scope names for idle scopes. A scope that took a charge since the last drain is
*active*: it keeps a reference to its name so that `drain` can say which Redis keys to push.

Times are seconds on Redis's clock (`now` is the caller's estimate of it); window starts are
whole seconds, as LiteLLM writes them.
"""

from collections.abc import Sequence
from typing import Any, Final, final

from typing_extensions import Self

__all__ = ["ADMITTED", "DENIED", "EXACT", "LOAD", "Table"]

ADMITTED: Final[int]
"""Outcome: admitted from local state and charged to every scope."""
DENIED: Final[int]
"""Outcome: a scope is over its limit by what this process already knows; nothing charged."""
LOAD: Final[int]
"""Outcome: a scope is unknown, its window has ended, or its state is stale; read it from Redis."""
EXACT: Final[int]
"""Outcome: this process holds no lease for a scope (its share is spent); ask Redis atomically."""

@final
class Table:
    """Per-scope window start, fleet totals and local pending deltas, for requests and tokens.

    Args:
        max_scopes: The most scopes tracked at once. Past it, inserting a scope evicts an
            idle, synced scope; when every tracked scope has unsynced deltas, the new scope is
            not tracked (`apply` returns False) and its checks keep going to Redis.
        shards: How many independently locked parts the table has (a power of two).
        decision: A subclass of `tuple` with five fields (the limiter's `Decision`) that
            `decide_one` builds its answers as, without calling the class's `__new__`; None
            for plain tuples.

    Raises:
        ValueError: `max_scopes` is 0 or above 2**31, or `shards` is not a power of two
            between 1 and 1024.
        TypeError: `decision` is not a subclass of `tuple`.
    """

    def __new__(
        cls, max_scopes: int, shards: int = 64, decision: type[tuple[Any, ...]] | None = None
    ) -> Self: ...
    def check(
        self,
        scopes: Sequence[str],
        rpm: Sequence[int],
        tpm: Sequence[int],
        tokens: int,
        now: float,
        window: int,
        proxies: int,
        *,
        offline: bool = False,
        requests: int = 1,
    ) -> tuple[int, int, int, int, float]:
        """Check one request against every scope and, if all admit it, charge every scope.

        Each scope is charged one request and `tokens` tokens, or nothing at all.

        Args:
            scopes: Scope names, `descriptor_key:descriptor_value`.
            rpm: The request limit of each scope; 0 means no request limit.
            tpm: The token limit of each scope; 0 means no token limit.
            tokens: The token estimate to charge (0 or more). With 0, a token limit only
                requires the scope to be below it.
            now: The current time on Redis's clock, in seconds.
            window: The window length in seconds.
            proxies: How many proxies share the limits (1 or more); each may spend only its
                share of what remained at the last sync before it must ask Redis.
            offline: Redis is unreachable: never return `LOAD` or `EXACT`. A scope that is not
                tracked or whose window ended starts a local window at `floor(now)` with zero
                fleet totals; staleness and nearness are ignored; spending more than this
                proxy's share of what remained is `DENIED` until the window ends. A scope that
                cannot be tracked (the table is full of unsynced scopes) is `DENIED` with
                `retry_after` 1.0.
            requests: 1 to count the request, 0 to charge its tokens alone (a token
                reservation for a request already counted): no request limit is checked
                beyond the count already reached, and a stale scope goes to Redis.

        Returns:
            `(outcome, index, remaining_requests, remaining_tokens, retry_after)`: `index` is the
            scope that decided a non-admitted outcome (-1 when admitted); the remainders are the
            smallest over the scopes with such a limit after this charge (-1 when no scope has
            one, and both -1 when not admitted); `retry_after` is seconds until the denying
            scope's window ends (0 otherwise).
        """

    def check_one(
        self,
        scope: str,
        rpm: int,
        tpm: int,
        tokens: int,
        now: float,
        window: int,
        proxies: int,
        *,
        offline: bool = False,
        requests: int = 1,
    ) -> tuple[int, int, int, int, float]:
        """`check` for a single scope, without building sequences."""

    def decide_one(
        self,
        scope: str,
        rpm: int | None,
        tpm: int | None,
        tokens: int,
        now: float,
        window: int,
        proxies: int,
        offline: bool,
        requests: int | None = None,
        /,
    ) -> Any:
        """`check_one` for `TieredLimiter.try_acquire`'s hot path, in one call.

        The arguments are validated as the limiter validates them (`scope` exactly a `str` of
        1 to 1024 bytes of UTF-8; `rpm` and `tpm` None for no limit, else exactly an `int`
        from 1 to 2**32 - 1; `tokens` exactly an `int` from 0 to 2**32 - 1), before any
        counter changes.

        Returns:
            When local state decides (`ADMITTED` or `DENIED`), `(allowed, remaining,
            retry_after, remaining_tokens, scope)` as an instance of the table's `decision`
            class (a plain tuple without one): `remaining*` None where no such limit, `scope`
            the scope when denied, else None. None for `LOAD` and `EXACT`.

        Raises:
            TypeError: An argument has the wrong type (the message names it).
            ValueError: An argument is out of range.
        """

    def record(self, scope: str, tokens: int, now: float, window: int) -> bool:
        """Add a signed token correction to a scope's pending delta; it counts as use when
        the next drain sizes the token lease.

        Returns:
            False when the scope is not tracked or its window has ended; the caller then sends
            the correction to Redis itself, or drops it when the window has ended.
        """

    def drain(
        self, now: float, window: int, idle_drains: int, lease_drains: int | None = None
    ) -> list[tuple[str, int, int, int, int, int, int, int]]:
        """Settle the active scopes that are due for a sync, leaving their leases in place.

        A scope's pending delta is positive for charges made without a lease and negative
        for the lease it still holds (capacity Redis already counts as this proxy's). A scope
        is due when it holds charges made without a lease of a limited kind, when its lease
        would not last two more drains at the pace it was used since it was last settled,
        or `lease_drains` drains after that; a scope not due is left as it is. A due scope
        keeps a lease of `lease_drains + 1` drains at that pace (the part beyond two drains
        at most a sixteenth of the limit, and at least one request's worth while used
        recently), gives back the rest, and asks for the difference; with `lease_drains` 1,
        every scope used is settled at every drain to twice its last use. A scope untouched
        for `idle_drains` drains in a row gives back its whole lease and, once nothing is
        left, stops being active (stale). Scopes whose window has ended are dropped.

        Raises:
            ValueError: lease_drains is 0.

        Returns:
            `(scope, window_start, requests, tokens, want_requests, want_tokens, rpm, tpm)` for
            each scope settled with something to push, a lease to ask for, or use to read
            the fleet's totals back for.
        """

    def take(
        self, scope: str, *, keep_request_lease: bool = False, keep_token_lease: bool = False
    ) -> tuple[int, int, int] | None:
        """Take one scope's pending delta, as `(window_start, requests, tokens)`, or None.

        A kind whose `keep_*_lease` is true gives up only its charges (a positive pending
        delta) and keeps its lease: an exact check with no limit of that kind cannot renew it.
        """

    def restore(
        self, scope: str, window_start: int, requests: int, tokens: int, now: float, window: int
    ) -> bool:
        """Give back a delta that could not be pushed.

        Returns:
            False when the delta was dropped: its window has ended or the scope is gone.
        """

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
        """Set a scope's fleet totals as Redis returned them, inserting the scope if needed.

        `lease_*` is what Redis just reserved for this proxy (already inside the totals); it
        becomes spendable here. A reply about a window that has ended is ignored. Redis's open
        window replaces the table's, and the pending deltas survive unless the table's window
        has ended. The scope counts as fresh until it has been idle long enough to be dropped
        from the active set.

        Returns:
            False when the scope could not be tracked (the table is full of unsynced scopes).
        """

    def forget_leases(self) -> int:
        """Drop every lease held (negative pending deltas become 0), keeping unpushed charges.

        For when Redis no longer holds the leases (it restarted empty). Returns how many
        scopes held one.
        """

    def forget_lease(self, scope: str) -> bool:
        """`forget_leases` for one scope; True when it held a lease."""

    def evict(self, now: float, window: int, budget: int) -> int:
        """Evict up to `budget` idle scopes whose window ended; returns how many it evicted."""

    def stats(self) -> dict[str, int]:
        """Counters: `scopes`, `active`, `memory_bytes`, `evictions`, `rejected`, `pending`.

        `memory_bytes` is what the table itself allocated (index, entries, active records and
        their names); each shard reserves room for its share of `max_scopes` entries up front as
        address space, counted here only up to the memory page its last entry is on.
        `rejected` counts scopes that could not be tracked, `pending` the scopes with a
        non-zero pending delta.
        """

    def __len__(self) -> int: ...
