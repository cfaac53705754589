"""The Rust table against its Python reference model, operation by operation (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_limiter import Decision, _native

from .reference_table import ReferenceTable

WINDOW = 10
START = 1_800_000_000
SCOPES = ["api_key:a", "user:b", "team:c", "end_user:d"]

limits = st.sampled_from([0, 1, 2, 5, 20, 100])
scope_lists = st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3, unique=True)
ops = st.one_of(
    st.tuples(
        st.just("check"),
        scope_lists,
        st.lists(limits, min_size=3, max_size=3),
        st.lists(limits, min_size=3, max_size=3),
        st.integers(0, 30),
        st.integers(1, 4),
        st.booleans(),
    ),
    st.tuples(
        st.just("apply"),
        st.sampled_from(SCOPES),
        st.integers(0, 3),
        st.integers(0, 120),
        st.integers(0, 500),
        st.integers(0, 6),
        st.integers(0, 60),
    ),
    st.tuples(st.just("drain"), st.integers(1, 3)),
    st.tuples(st.just("take"), st.sampled_from(SCOPES)),
    st.tuples(st.just("record"), st.sampled_from(SCOPES), st.integers(-50, 50)),
    st.tuples(st.just("advance"), st.floats(0.0, 6.0)),
    # A budget of none or of every scope: with fewer than the candidates, which ones go
    # depends on the table's hash order (its key is random), which the model cannot follow.
    st.tuples(st.just("evict"), st.sampled_from([0, len(SCOPES)])),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ops, max_size=80))
def test_native_table_matches_reference(program: list[tuple[object, ...]]) -> None:
    native = _native.Table(1000, 4)
    model = ReferenceTable(1000)
    now = float(START)
    taken: dict[str, tuple[int, int, int]] = {}
    for op in program:
        kind = op[0]
        if kind == "advance":
            now += op[1]  # type: ignore[operator]
        elif kind == "check":
            _, scopes, rpm, tpm, tokens, proxies, offline = op
            n = len(scopes)  # type: ignore[arg-type]
            args = (scopes, rpm[:n], tpm[:n], tokens, now, WINDOW, proxies)  # type: ignore[index]
            got = native.check(*args, offline=offline)
            want = model.check(*args, offline=offline)  # type: ignore[arg-type]
            assert got[:4] == want[:4], (op, got, want)
            assert math.isclose(got[4], want[4], abs_tol=1e-6)
        elif kind == "apply":
            _, scope, back, req, tok, lease_r, lease_t = op
            ws = math.floor(now) - back  # type: ignore[operator]
            args = (scope, ws, req, tok, now, WINDOW, lease_r, lease_t)
            assert native.apply(*args) == model.apply(*args)  # type: ignore[arg-type]
        elif kind == "drain":
            idle = op[1]
            drained = sorted(native.drain(now, WINDOW, idle))  # type: ignore[arg-type]
            assert drained == sorted(model.drain(now, WINDOW, idle)), op  # type: ignore[arg-type]
        elif kind == "take":
            got_t = native.take(op[1])  # type: ignore[arg-type]
            assert got_t == model.take(op[1])  # type: ignore[arg-type]
            if got_t is not None:
                taken[op[1]] = got_t  # type: ignore[index]
        elif kind == "record":
            assert native.record(op[1], op[2], now, WINDOW) == model.record(  # type: ignore[arg-type]
                op[1],
                op[2],
                now,
                WINDOW,  # type: ignore[arg-type]
            )
        elif kind == "evict":
            assert native.evict(now, WINDOW, op[1]) == model.evict(now, WINDOW, op[1])  # type: ignore[arg-type]
        assert len(native) == len(model)
    for scope, (ws, req, tok) in taken.items():
        assert native.restore(scope, ws, req, tok, now, WINDOW) == model.restore(
            scope, ws, req, tok, now, WINDOW
        )
    assert sorted(native.drain(now, WINDOW, 1)) == sorted(model.drain(now, WINDOW, 1))


def test_full_table_of_scopes_with_deltas_to_push_rejects_new_ones() -> None:
    table = _native.Table(4, 1)
    for i in range(4):
        assert table.apply(f"user:{i}", START, 0, 0, START + 1.0, WINDOW, 5)
        assert table.check_one(f"user:{i}", 10, 0, 0, START + 1.0, WINDOW, 1)[0] == _native.ADMITTED
        assert table.record(f"user:{i}", 3, START + 1.0, WINDOW)
    assert not table.apply("user:new", START, 0, 0, START + 1.0, WINDOW)
    assert table.stats()["rejected"] == 1
    assert len(table) == 4


def test_full_table_evicts_a_synced_scope_first() -> None:
    table = _native.Table(4, 1)
    for i in range(4):
        table.apply(f"user:{i}", START, 0, 0, START + 1.0, WINDOW)
    table.apply("user:0", START, 5, 0, START + 1.0, WINDOW, 5)
    table.check_one("user:0", 10, 0, 0, START + 1.0, WINDOW, 1)
    table.drain(START + 1.0, WINDOW, 1)  # user:0 has a delta in flight; the others go idle
    assert table.apply("user:new", START, 0, 0, START + 1.0, WINDOW)
    assert table.stats()["evictions"] == 1
    assert table.take("user:0") is not None


def test_flood_of_scopes_stays_within_max_scopes() -> None:
    table = _native.Table(10_000, 16)
    for i in range(100_000):
        table.apply(f"end_user:{i}", START, 1, 1, START + 1.0, WINDOW)
        if i % 1000 == 999:
            table.drain(START + 1.0, WINDOW, 1)
    assert len(table) <= 10_000
    assert table.stats()["evictions"] >= 90_000
    assert table.stats()["memory_bytes"] < 10_000 * 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 64), "max_scopes"),
        ((10, 3), "shards"),
        ((10, 0), "shards"),
    ],
)
def test_bad_table_configuration_raises(args: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _native.Table(*args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window"),
        ({"now": math.nan}, "now"),
        ({"now": -1.0}, "now"),
        ({"proxies": 0}, "proxies"),
        ({"rpm": -1}, "rpm"),
        ({"tokens": -1}, "tokens"),
    ],
)
def test_bad_check_arguments_raise_value_errors(kwargs: dict[str, float], message: str) -> None:
    table = _native.Table(10, 1)
    args = {"scope": "user:x", "rpm": 5, "tpm": 0, "tokens": 0, "now": 1e9, "window": 60}
    args |= {"proxies": 1} | kwargs
    with pytest.raises((ValueError, OverflowError), match=message):
        table.check_one(**args)  # type: ignore[arg-type]
    assert len(table) == 0


class _Str(str):
    pass


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("",), ValueError, "scope"),
        (("x" * 1025,), ValueError, "scope"),
        (("\ud800",), ValueError, "scope"),
        ((_Str("user:x"),), TypeError, "scope"),
        ((b"user:x",), TypeError, "scope"),
        (("user:x", 0), ValueError, "rpm"),
        (("user:x", 2**32), ValueError, "rpm"),
        (("user:x", True), TypeError, "rpm"),
        (("user:x", 5.0), TypeError, "rpm"),
        (("user:x", None, -1), ValueError, "tpm"),
        (("user:x", None, None, True), TypeError, "tokens"),
        (("user:x", None, None, -1), ValueError, "tokens"),
        (("user:x", None, None, 0, math.nan), ValueError, "now"),
        (("user:x", None, None, 0, 1e9, 0), ValueError, "window"),
        (("user:x", None, None, 0, 1e9, 60, 0), ValueError, "proxies"),
    ],
)
def test_decide_one_validates_as_the_limiter_does(
    args: tuple[object, ...], error: type[Exception], message: str
) -> None:
    table = _native.Table(10, 1)
    full = args + ("user:x", 5, 5, 0, 1e9, 60, 1, True)[len(args) :]
    with pytest.raises(error, match=message):
        table.decide_one(*full)  # type: ignore[arg-type]
    assert len(table) == 0


def test_decide_one_answers_as_check_one() -> None:
    """Admitted and denied give a Decision's fields; a scope that needs Redis gives None."""
    table = _native.Table(10, 1)
    assert table.decide_one("user:x", 2, None, 3, START, WINDOW, 1, False) is None
    assert table.decide_one("user:x", 2, None, 3, START, WINDOW, 1, True) == (
        True,
        1,
        0.0,
        None,
        None,
    )
    assert table.decide_one("user:x", None, 100, 3, START, WINDOW, 1, True) == (
        True,
        None,
        0.0,
        94,
        None,
    )
    denied = table.decide_one("user:x", 2, None, 3, START + 4.0, WINDOW, 1, True)
    # Denied over its limit: what is left of it (nothing), as LiteLLM's 429 reports it.
    assert denied == (False, 0, WINDOW - 4.0, None, "user:x")


def test_decide_one_builds_the_decision_class() -> None:
    table = _native.Table(10, 1, Decision)
    decision = table.decide_one("user:x", 1, None, 0, START, WINDOW, 1, True)
    assert type(decision) is Decision
    assert decision == Decision(True, 0, 0.0, None, None)
    denied = table.decide_one("user:x", 1, None, 0, START, WINDOW, 1, True)
    assert denied == Decision(False, 0, float(WINDOW), None, "user:x")
    assert denied.scope == "user:x"


@pytest.mark.parametrize("decision", [dict, 5, "Decision"])
def test_decision_class_must_be_a_tuple_subclass(decision: object) -> None:
    with pytest.raises(TypeError, match="decision must be a subclass of tuple"):
        _native.Table(10, 1, decision)  # type: ignore[arg-type]
