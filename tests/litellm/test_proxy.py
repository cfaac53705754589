"""The adapter inside real `litellm` proxies, against a real redis-server, over HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from tiered_limiter.litellm import load

from ..support import RedisServer
from .conftest import MOCK_TOKENS, Keys, Proxy, StartProxy, evalsha_calls, hashed, wait_for

pytestmark = pytest.mark.slow


def _count(rdb: redis.Redis, scope: str, kind: str) -> int:
    value = rdb.get(f"{{{scope}}}:{kind}")
    return 0 if value is None else int(float(value))


def test_denies_key_over_its_rpm_limit_with_litellms_429(
    start_proxy: StartProxy, keys: Keys, rdb: redis.Redis
) -> None:
    key = keys.add("sk-rpm3", rpm_limit=3)
    proxy = start_proxy()

    assert proxy.statuses(key, 3) == [200, 200, 200]
    denied = proxy.chat(key)

    assert denied.status_code == 429
    assert denied.headers["retry-after"]
    assert "api_key" in denied.json()["error"]["message"]
    scope = f"api_key:{hashed(key)}"
    wait_for(lambda: _count(rdb, scope, "requests") == 3, what="3 requests synced to Redis")
    assert rdb.get(f"{{{scope}}}:window") is not None


def test_admitted_response_carries_litellms_ratelimit_headers(
    start_proxy: StartProxy, keys: Keys
) -> None:
    key = keys.add("sk-headers", rpm_limit=10)
    proxy = start_proxy()

    first = proxy.chat(key)

    assert first.status_code == 200
    assert first.headers["x-ratelimit-api_key-limit-requests"] == "10"
    assert first.headers["x-ratelimit-api_key-remaining-requests"] == "9"


def test_enforces_user_limit_across_two_keys(start_proxy: StartProxy, keys: Keys) -> None:
    a = keys.add("sk-user-a", user_id="u-1", user_rpm_limit=3)
    b = keys.add("sk-user-b", user_id="u-1", user_rpm_limit=3)
    proxy = start_proxy()

    assert proxy.statuses(a, 2) + proxy.statuses(b, 1) == [200, 200, 200]
    denied = proxy.chat(b)

    assert denied.status_code == 429
    assert "user" in denied.json()["error"]["message"]


def test_enforces_team_limit_across_users(start_proxy: StartProxy, keys: Keys) -> None:
    a = keys.add("sk-team-a", user_id="u-1", team_id="t-1", team_rpm_limit=2)
    b = keys.add("sk-team-b", user_id="u-2", team_id="t-1", team_rpm_limit=2)
    proxy = start_proxy()

    assert [proxy.chat(a).status_code, proxy.chat(b).status_code] == [200, 200]
    assert proxy.chat(a).status_code == 429


def test_enforces_per_model_limit_of_a_key(start_proxy: StartProxy, keys: Keys) -> None:
    key = keys.add("sk-model", rpm_limit=100, metadata={"model_rpm_limit": {"fake": 2}})
    proxy = start_proxy()

    assert proxy.statuses(key, 2) == [200, 200]
    denied = proxy.chat(key)

    assert denied.status_code == 429
    assert "model_per_key" in denied.json()["error"]["message"]


def test_charges_actual_tokens_after_the_call(
    start_proxy: StartProxy, keys: Keys, rdb: redis.Redis
) -> None:
    """The estimate charged before the call is corrected to the usage the response reports."""
    key = keys.add("sk-tpm", rpm_limit=100, tpm_limit=100_000)
    proxy = start_proxy()
    scope = f"api_key:{hashed(key)}"

    assert proxy.statuses(key, 4) == [200] * 4
    # Redis also holds the proxy's leases until it gives them back; a clean stop does.
    proxy.stop()

    assert _count(rdb, scope, "requests") == 4
    assert _count(rdb, scope, "tokens") == 4 * MOCK_TOKENS


def test_denies_when_token_limit_is_spent(start_proxy: StartProxy, keys: Keys) -> None:
    """With no reservation, usage charged after each call spends the token limit."""
    key = keys.add("sk-tpm-small", tpm_limit=2 * MOCK_TOKENS)
    proxy = start_proxy(env={"LITELLM_TPM_TOKEN_RESERVATION_ENABLED": "false"})

    assert proxy.statuses(key, 2) == [200, 200]
    statuses = [proxy.chat(key).status_code for _ in range(2)]

    # A call's usage is charged just after its response is sent, so at most one more request
    # may start before the second call's usage is in; none after that.
    assert statuses in ([429, 429], [200, 429]), statuses


def test_token_reservation_denies_as_litellms_own_limiter_does(
    start_proxy: StartProxy, keys: Keys
) -> None:
    """With rpm and tpm on a key and reservation on (the default), the tier refuses the request
    whose token estimate no longer fits, as LiteLLM's limiter does: the same statuses and the
    same TPM 429."""
    tier_key = keys.add("sk-tpm-reserve-tier", rpm_limit=1000, tpm_limit=100)
    own_key = keys.add("sk-tpm-reserve-own", rpm_limit=1000, tpm_limit=100)
    tier, own = start_proxy(), start_proxy(tier=False)

    tier_replies = [tier.chat(tier_key) for _ in range(5)]
    own_replies = [own.chat(own_key) for _ in range(5)]

    assert [r.status_code for r in tier_replies] == [r.status_code for r in own_replies]
    assert [r.status_code for r in tier_replies] == [200, 200, 200, 429, 429]
    assert (
        tier_replies[0].headers["x-ratelimit-api_key-remaining-tokens"]
        == own_replies[0].headers["x-ratelimit-api_key-remaining-tokens"]
    )
    # The first reply's remaining tokens are the limit less one request's estimate.
    estimate = 100 - int(tier_replies[0].headers["x-ratelimit-api_key-remaining-tokens"])
    # A call's usage replaces its estimate just after its response is sent (LiteLLM's success
    # callback), so the fourth request may be checked before the third call's correction.
    settled, racing = 100 - 3 * MOCK_TOKENS, 100 - 2 * MOCK_TOKENS - estimate
    for replies in (tier_replies, own_replies):
        assert replies[3].headers["rate_limit_type"] == "tokens"
        message = replies[3].json()["error"]["message"]
        assert "Limit type: tokens" in message
        assert f"Remaining: {settled}." in message or f"Remaining: {racing}." in message


def test_mixed_fleet_agrees_on_one_count(
    start_proxy: StartProxy, keys: Keys, rdb: redis.Redis
) -> None:
    """A proxy with the tier and one without share each key's window in Redis."""
    first = keys.add("sk-fleet-stock-first", rpm_limit=6)
    second = keys.add("sk-fleet-tier-first", rpm_limit=6)
    tiered = start_proxy()
    stock = start_proxy(tier=False)

    # The tier reads LiteLLM's count and admits exactly what is left; LiteLLM then sees the
    # tier's admissions (and counts its own first rejection, as it always does).
    assert stock.statuses(first, 3) == [200, 200, 200]
    assert tiered.statuses(first, 4) == [200, 200, 200, 429]
    assert stock.chat(first).status_code == 429
    assert _count(rdb, f"api_key:{hashed(first)}", "requests") == 7

    # A tier proxy that stops cleanly gives its leases back: Redis holds what it admitted, and
    # LiteLLM admits exactly the rest.
    assert tiered.statuses(second, 3) == [200, 200, 200]
    tiered.stop()
    assert _count(rdb, f"api_key:{hashed(second)}", "requests") == 3
    assert stock.statuses(second, 4) == [200, 200, 200, 429]


@pytest.mark.parametrize(
    "limits",
    [{"rpm_limit": 10_000, "tpm_limit": 10_000_000}, {}],
    ids=["rpm_and_tpm", "no_limits"],
)
def test_warm_key_makes_no_redis_script_call_per_request(
    start_proxy: StartProxy, keys: Keys, rdb: redis.Redis, limits: dict[str, int]
) -> None:
    """LiteLLM's own limiter runs 3 scripts per request with rpm and tpm limits, and 1 (the
    token charge of every scope) with none; the tier runs a couple per sync, whatever the
    request rate."""
    key = keys.add(f"sk-warm-{len(limits)}", **limits)
    proxy = start_proxy(env={"TIERED_LIMITER_SYNC_INTERVAL": "0.5"})
    assert proxy.statuses(key, 5) == [200] * 5

    before = evalsha_calls(rdb)
    assert proxy.statuses(key, 60) == [200] * 60
    scripts = evalsha_calls(rdb) - before

    assert scripts < 60 / 2, scripts


@pytest.mark.parametrize(
    ("env", "general"),
    [
        ({"TIERED_LIMITER": "off"}, None),
        ({}, {"tiered_limiter": {"mode": "off"}}),
    ],
    ids=["environment", "general_settings"],
)
def test_kill_switch_leaves_litellms_limiter_in_charge(
    start_proxy: StartProxy,
    keys: Keys,
    rdb: redis.Redis,
    env: dict[str, str],
    general: dict[str, Any] | None,
) -> None:
    key = keys.add("sk-off", rpm_limit=3)
    proxy = start_proxy(env=env, general=general)

    before = evalsha_calls(rdb)
    assert proxy.statuses(key, 4) == [200, 200, 200, 429]

    # LiteLLM's limiter runs its scripts in the request, and counts the first rejection,
    # which the tier never charges.
    assert evalsha_calls(rdb) - before >= 3
    assert _count(rdb, f"api_key:{hashed(key)}", "requests") == 4


def test_canary_sends_a_stable_share_of_keys_to_the_tier(
    start_proxy: StartProxy, keys: Keys, rdb: redis.Redis
) -> None:
    settings = load(environ={"TIERED_LIMITER": "canary:50"})
    candidates = [f"sk-canary-{i}" for i in range(40)]
    inside = next(k for k in candidates if settings.takes_tier(hashed(k)))
    outside = next(k for k in candidates if not settings.takes_tier(hashed(k)))
    keys.add(inside, rpm_limit=3)
    keys.add(outside, rpm_limit=3)
    proxy = start_proxy(env={"TIERED_LIMITER": "canary:50"})

    assert proxy.statuses(inside, 4) == [200, 200, 200, 429]
    assert proxy.statuses(outside, 4) == [200, 200, 200, 429]

    # LiteLLM counts its first rejection in Redis; the tier charges a denial nothing.
    assert _count(rdb, f"api_key:{hashed(outside)}", "requests") == 4
    wait_for(lambda: _count(rdb, f"api_key:{hashed(inside)}", "requests") == 3, what="tier count")


def test_canary_share_is_stable_and_close_to_its_percent() -> None:
    settings = load(environ={"TIERED_LIMITER": "canary:25"})
    picked = [settings.takes_tier(hashed(f"sk-{i}")) for i in range(4000)]

    assert picked == [settings.takes_tier(hashed(f"sk-{i}")) for i in range(4000)]
    assert 0.22 < sum(picked) / len(picked) < 0.28


def test_serves_through_redis_outage_and_resyncs_after(
    start_proxy: StartProxy, keys: Keys, redis_srv: RedisServer, rdb: redis.Redis
) -> None:
    """Redis killed: the key stays limited from local state, with no server error; Redis
    restarted empty: what the proxy admitted during the outage reaches it."""
    key = keys.add("sk-outage", rpm_limit=5)
    proxy = start_proxy()
    scope = f"api_key:{hashed(key)}"
    assert proxy.statuses(key, 2) == [200, 200]
    # An idle scope gives its lease back (after the core's idle_release, 5 s), so that Redis
    # holds the two admissions alone and every admission of the outage is a charge to push.
    wait_for(lambda: _count(rdb, scope, "requests") == 2, timeout=30, what="the lease given back")

    redis_srv.stop()
    during = proxy.statuses(key, 4)

    # 2 + 3 admitted, then denied: this proxy's share of what was left at its last sync.
    assert during == [200, 200, 200, 429], proxy.tail(60)
    redis_srv.start()
    client = redis.Redis(port=redis_srv.port, decode_responses=True)
    try:
        wait_for(
            lambda: _count(client, scope, "requests") == 3,
            timeout=30,
            what="the outage's 3 admissions pushed to the restarted Redis",
            now=lambda: f"Redis holds {_count(client, scope, 'requests')}; {proxy.tail(40)}",
        )
        assert client.get(f"{{{scope}}}:window") is not None
    finally:
        client.close()


def test_fail_closed_answers_503_while_redis_is_away(
    start_proxy: StartProxy, keys: Keys, redis_srv: RedisServer
) -> None:
    """`fail_closed_rate_limit_enforcement` keeps its meaning: once this proxy's lease (which
    Redis counts) is spent, no admission Redis cannot verify, LiteLLM's 503 instead, and
    service again when Redis is back."""
    key = keys.add("sk-closed", rpm_limit=1000)
    proxy = start_proxy(general={"fail_closed_rate_limit_enforcement": True})
    # On a starved machine a cold scope's first read can outlast redis_timeout, and then the
    # outage policy answers it: a 503 here.
    wait_for(lambda: proxy.chat(key).status_code == 200, what="the tier verified against Redis")
    assert proxy.statuses(key, 2) == [200, 200]

    redis_srv.stop()
    seen: list[int] = []

    def refused() -> bool:
        seen.append(proxy.chat(key).status_code)
        return seen[-1] == 503

    # Until a sync fails the tier serves from its lease, which Redis already counts.
    wait_for(refused, what="a 503 once the outage is noticed")
    assert set(seen) <= {200, 503}, seen
    assert proxy.statuses(key, 3) == [503, 503, 503]

    redis_srv.start()
    wait_for(lambda: proxy.chat(key).status_code == 200, timeout=30, what="service back")


def test_max_parallel_requests_stays_on_litellms_fleet_wide_gauge(
    start_proxy: StartProxy, keys: Keys
) -> None:
    """The tier leaves `max_parallel_requests` to LiteLLM's exact gauge in Redis: one call in
    flight on one tier proxy refuses the key's second call on another."""
    key = keys.add("sk-parallel", rpm_limit=100, max_parallel_requests=1)
    # A request may ask for LiteLLM's mock delay only where the config allows it.
    general = {"dangerously_allow_mock_testing_request_params": True}
    first, second = start_proxy(general=general), start_proxy(general=general)
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": "hello"}],
        "mock_delay": 3.0,  # LiteLLM's mock sleeps this long before answering
    }

    def call(proxy: Proxy) -> int:
        response = proxy.client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        return response.status_code

    with ThreadPoolExecutor(max_workers=2) as pool:
        statuses = sorted(pool.map(call, [first, second]))

    assert statuses == [200, 429]
    # The slot is given back after the call.
    assert first.chat(key).status_code == 200
