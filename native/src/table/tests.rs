//! Behaviour tests of the table: one per rule, a property test against a small reference
//! model (a port of `tests/reference_table.py`), exact-count concurrency tests and the
//! eviction cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

const W: u32 = 60;

fn table() -> Table {
    Table::with_key(1000, 4, (1, 2)).expect("valid configuration")
}

fn request(tokens: u32, now: f64) -> Request {
    Request {
        requests: 1,
        tokens,
        now,
        window: W,
        proxies: 1,
        offline: false,
    }
}

fn one(t: &Table, name: &str, rpm: u32, tpm: u32, req: &Request) -> Decision {
    t.check(&[ScopeLimit { name, rpm, tpm }], req)
}

fn outcome(t: &Table, name: &str, rpm: u32, tpm: u32, tokens: u32, now: f64) -> Outcome {
    one(t, name, rpm, tpm, &request(tokens, now)).outcome
}

/// Applies fleet totals with no lease.
fn apply(t: &Table, name: &str, window_start: u32, requests: u32, tokens: u32, now: f64) -> bool {
    let totals = Totals {
        window_start,
        requests,
        tokens,
        ..Totals::default()
    };
    t.apply(name, &totals, now, W)
}

/// Applies fleet totals that include a lease of `lease = (requests, tokens)` for this proxy.
fn lease(t: &Table, name: &str, window_start: u32, lease: (u32, u32), now: f64) -> bool {
    let totals = Totals {
        window_start,
        requests: lease.0,
        tokens: lease.1,
        lease_requests: lease.0,
        lease_tokens: lease.1,
    };
    t.apply(name, &totals, now, W)
}

/// Drains with records released after one idle drain.
fn drain(t: &Table, now: f64) -> Vec<Delta> {
    t.drain(now, W, 1, 1)
}

fn delta(
    scope: &str,
    window_start: u32,
    push: (i64, i64),
    want: (u32, u32),
    limits: (u32, u32),
) -> Delta {
    Delta {
        scope: scope.into(),
        window_start,
        requests: push.0,
        tokens: push.1,
        want_requests: want.0,
        want_tokens: want.1,
        rpm: limits.0,
        tpm: limits.1,
    }
}

#[test]
fn entry_is_24_bytes_with_align_4() {
    assert_eq!(ENTRY_BYTES, 24);
    assert_eq!(std::mem::align_of::<Entry>(), 4);
}

#[test]
fn rejects_bad_configuration() {
    assert_eq!(Table::new(0, 64).err(), Some(ConfigError::MaxScopes(0)));
    assert_eq!(
        Table::new(MAX_SCOPES + 1, 64).err(),
        Some(ConfigError::MaxScopes(MAX_SCOPES + 1))
    );
    assert_eq!(Table::new(10, 3).err(), Some(ConfigError::Shards(3)));
    assert_eq!(Table::new(10, 2048).err(), Some(ConfigError::Shards(2048)));
    assert!(Table::new(MAX_SCOPES, 1).is_ok());
    assert!(Table::new(1, 1024).is_ok());
}

#[test]
fn loads_a_scope_it_does_not_track() {
    let t = table();
    let d = one(&t, "user:u", 10, 0, &request(1, 100.0));
    assert_eq!(d, Decision::not_admitted(Outcome::Load, 0, 0.0));
    assert!(t.is_empty());
}

#[test]
fn loads_when_the_window_ended() {
    let t = table();
    assert!(lease(&t, "user:u", 100, (5, 0), 100.0));
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 159.9), Outcome::Admitted);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 160.0), Outcome::Load);
}

#[test]
fn denies_when_known_total_reaches_limit() {
    let t = table();
    assert!(apply(&t, "user:u", 100, 10, 0, 100.0));
    let d = one(&t, "user:u", 10, 0, &request(0, 130.5));
    let denied = Decision {
        remaining_requests: 0,
        ..Decision::not_admitted(Outcome::Denied, 0, 29.5)
    };
    assert_eq!(d, denied);
}

#[test]
fn denies_when_known_plus_pending_reaches_limit() {
    let t = table();
    // 7 counted by the fleet, 3 of which are this proxy's lease.
    let totals = Totals {
        window_start: 100,
        requests: 10,
        lease_requests: 3,
        ..Totals::default()
    };
    assert!(t.apply("user:u", &totals, 100.0, W));
    for left in [2, 1, 0] {
        let d = one(&t, "user:u", 10, 0, &request(0, 100.0));
        assert_eq!(d.outcome, Outcome::Admitted);
        assert_eq!(d.remaining_requests, left);
        assert_eq!(d.remaining_tokens, -1);
    }
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 100.0), Outcome::Denied);
}

#[test]
fn denies_a_token_estimate_that_would_pass_the_limit() {
    let t = table();
    let totals = Totals {
        window_start: 100,
        tokens: 90,
        lease_tokens: 10,
        ..Totals::default()
    };
    assert!(t.apply("user:u", &totals, 100.0, W));
    assert_eq!(outcome(&t, "user:u", 0, 100, 21, 100.0), Outcome::Denied);
    assert_eq!(outcome(&t, "user:u", 0, 100, 11, 100.0), Outcome::Exact);
    let d = one(&t, "user:u", 0, 100, &request(10, 100.0));
    assert_eq!(d.outcome, Outcome::Admitted);
    assert_eq!((d.remaining_requests, d.remaining_tokens), (-1, 10));
}

#[test]
fn zero_token_estimate_requires_strictly_below_limit() {
    let t = table();
    assert!(apply(&t, "user:u", 100, 0, 99, 100.0));
    assert_eq!(outcome(&t, "user:u", 0, 100, 0, 100.0), Outcome::Admitted);
    assert!(apply(&t, "user:u", 100, 0, 100, 100.0));
    assert_eq!(outcome(&t, "user:u", 0, 100, 0, 100.0), Outcome::Denied);
}

#[test]
fn admits_locally_only_within_the_lease() {
    let t = table();
    // Online, the number of proxies plays no part: the lease is what this proxy may spend.
    let req = |tokens| Request {
        requests: 1,
        proxies: 3,
        ..request(tokens, 100.0)
    };
    assert!(lease(&t, "user:u", 100, (3, 0), 100.0));
    for _ in 0..3 {
        assert_eq!(one(&t, "user:u", 10, 0, &req(0)).outcome, Outcome::Admitted);
    }
    assert_eq!(
        one(&t, "user:u", 10, 0, &req(0)),
        Decision::not_admitted(Outcome::Exact, 0, 0.0)
    );
    assert_eq!(t.take("user:u"), Some((100, 0, 0)));

    assert!(lease(&t, "team:t", 100, (0, 100), 100.0));
    assert_eq!(
        one(&t, "team:t", 0, 1000, &req(40)).outcome,
        Outcome::Admitted
    );
    assert_eq!(
        one(&t, "team:t", 0, 1000, &req(40)).outcome,
        Outcome::Admitted
    );
    assert_eq!(one(&t, "team:t", 0, 1000, &req(40)).outcome, Outcome::Exact);
    assert_eq!(
        one(&t, "team:t", 0, 1000, &req(20)).outcome,
        Outcome::Admitted
    );
    assert_eq!(one(&t, "team:t", 0, 1000, &req(1)).outcome, Outcome::Exact);
    assert_eq!(
        one(&t, "team:t", 0, 1000, &req(0)).outcome,
        Outcome::Admitted
    );
    // A kind without a limit needs no lease.
    assert_eq!(one(&t, "team:t", 0, 0, &req(5)).outcome, Outcome::Admitted);
    assert_eq!(t.take("team:t"), Some((100, 5, 5)));

    // A fresh scope with no lease asks Redis for every request that has a limit.
    assert!(apply(&t, "model:m", 100, 0, 0, 100.0));
    assert_eq!(one(&t, "model:m", 10, 0, &req(0)).outcome, Outcome::Exact);
    assert_eq!(one(&t, "model:m", 0, 10, &req(1)).outcome, Outcome::Exact);
    assert_eq!(one(&t, "model:m", 0, 0, &req(1)).outcome, Outcome::Admitted);
}

#[test]
fn apply_adds_the_lease_as_negative_pending() {
    let t = table();
    assert!(lease(&t, "u", 100, (3, 30), 100.0));
    assert_eq!(t.stats().pending, 1);
    let more = Totals {
        window_start: 100,
        requests: 10,
        tokens: 40,
        lease_requests: 2,
        lease_tokens: 5,
    };
    assert!(t.apply("u", &more, 100.0, W));
    assert_eq!(t.take("u"), Some((100, -5, -35)));
    assert_eq!(t.stats().pending, 0);
}

#[test]
fn a_lease_first_pays_for_charges_made_without_one() {
    let t = table();
    assert!(apply(&t, "v", 100, 0, 0, 100.0));
    drain(&t, 100.0);
    assert!(t.restore("v", 100, 2, 0, 100.0, W));
    assert_eq!(
        outcome(&t, "v", 10, 0, 0, 100.0),
        Outcome::Load,
        "not fresh"
    );
    assert!(lease(&t, "v", 100, (3, 0), 100.0));
    assert_eq!(outcome(&t, "v", 10, 0, 0, 100.0), Outcome::Admitted);
    assert_eq!(outcome(&t, "v", 10, 0, 0, 100.0), Outcome::Exact);
    assert_eq!(t.take("v"), Some((100, 0, 0)));
}

#[test]
fn stale_scope_gets_exactly_one_optimistic_charge() {
    let t = table();
    assert!(apply(&t, "user:u", 100, 0, 0, 100.0));
    assert_eq!(drain(&t, 100.0), vec![]);
    assert_eq!(
        t.stats().active,
        0,
        "an untouched applied record lives one drain"
    );

    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Load);

    // The lease pays for the charge made on trust first.
    assert!(lease(&t, "user:u", 100, (2, 0), 101.0));
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Exact);
}

#[test]
fn stale_scope_with_drained_charge_gets_another_optimistic_charge() {
    let t = table();
    assert!(apply(&t, "user:u", 100, 0, 0, 100.0));
    drain(&t, 100.0);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
    assert_eq!(
        drain(&t, 101.0),
        vec![delta("user:u", 100, (1, 0), (3, 0), (10, 0))]
    );
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Load);
}

#[test]
fn denied_beats_load_beats_exact_and_the_first_scope_decides() {
    let t = table();
    assert!(apply(&t, "a", 100, 0, 0, 100.0));
    assert!(apply(&t, "b", 100, 10, 0, 100.0));
    assert!(apply(&t, "c", 100, 10, 0, 100.0));
    let unleased = ScopeLimit {
        name: "a",
        rpm: 1,
        tpm: 0,
    };
    let over = |name| ScopeLimit {
        name,
        rpm: 10,
        tpm: 0,
    };
    let unknown = ScopeLimit {
        name: "x",
        rpm: 10,
        tpm: 0,
    };
    let req = request(0, 100.0);
    assert_eq!(
        t.check(&[unleased, unknown, over("b"), over("c")], &req),
        Decision {
            remaining_requests: 0,
            ..Decision::not_admitted(Outcome::Denied, 2, 60.0)
        }
    );
    assert_eq!(
        t.check(&[unleased, unknown], &req),
        Decision::not_admitted(Outcome::Load, 1, 0.0)
    );
    assert_eq!(
        t.check(&[unleased], &req),
        Decision::not_admitted(Outcome::Exact, 0, 0.0)
    );
}

#[test]
fn a_denial_charges_no_scope() {
    let t = table();
    assert!(lease(&t, "a", 100, (10, 0), 100.0));
    assert!(apply(&t, "b", 100, 5, 0, 100.0));
    let scopes = [
        ScopeLimit {
            name: "a",
            rpm: 10,
            tpm: 0,
        },
        ScopeLimit {
            name: "b",
            rpm: 5,
            tpm: 0,
        },
    ];
    assert_eq!(
        t.check(&scopes, &request(3, 100.0)).outcome,
        Outcome::Denied
    );
    assert_eq!(t.take("a"), Some((100, -10, 0)));
    assert_eq!(t.take("b"), Some((100, 0, 0)));
}

#[test]
fn an_exact_scope_charges_no_scope() {
    let t = table();
    assert!(lease(&t, "a", 100, (10, 10), 100.0));
    assert!(lease(&t, "b", 100, (10, 2), 100.0));
    let scopes = [
        ScopeLimit {
            name: "a",
            rpm: 100,
            tpm: 100,
        },
        ScopeLimit {
            name: "b",
            rpm: 100,
            tpm: 100,
        },
    ];
    assert_eq!(
        t.check(&scopes, &request(3, 100.0)),
        Decision::not_admitted(Outcome::Exact, 1, 0.0)
    );
    assert_eq!(t.take("a"), Some((100, -10, -10)));
    assert_eq!(t.take("b"), Some((100, -10, -2)));
}

#[test]
fn admitted_check_charges_every_scope_and_reports_smallest_remainders() {
    let t = table();
    let a = Totals {
        window_start: 100,
        requests: 7,
        tokens: 150,
        lease_requests: 5,
        lease_tokens: 100,
    };
    let b = Totals {
        window_start: 100,
        requests: 3,
        tokens: 10,
        lease_requests: 2,
        lease_tokens: 0,
    };
    assert!(t.apply("a", &a, 100.0, W));
    assert!(t.apply("b", &b, 100.0, W));
    let scopes = [
        ScopeLimit {
            name: "a",
            rpm: 10,
            tpm: 1000,
        },
        ScopeLimit {
            name: "b",
            rpm: 5,
            tpm: 0,
        },
    ];
    let d = t.check(&scopes, &request(7, 100.0));
    assert_eq!(d.outcome, Outcome::Admitted);
    assert_eq!(d.index, None);
    assert_eq!((d.remaining_requests, d.remaining_tokens), (3, 943));
    let mut drained = drain(&t, 100.0);
    drained.sort_by(|x, y| x.scope.cmp(&y.scope));
    assert_eq!(
        drained,
        vec![
            // Holds 4 requests and 93 tokens, wants 2*1+1 and 2*7+7: gives the rest back.
            delta("a", 100, (-1, -72), (0, 0), (10, 1000)),
            // Holds 1 request, wants 3: asks for 2 more; its tokens were charged without a
            // lease (no token limit) and are pushed.
            delta("b", 100, (0, 7), (2, 0), (5, 0)),
        ]
    );
    assert_eq!(t.take("a"), Some((100, -3, -21)));
    assert_eq!(t.take("b"), Some((100, -1, 0)));
}

#[test]
fn drain_gives_back_lease_beyond_twice_the_use() {
    let t = table();
    assert!(lease(&t, "big", 100, (100, 1000), 100.0));
    assert!(lease(&t, "small", 100, (2, 0), 100.0));
    for _ in 0..3 {
        assert_eq!(outcome(&t, "big", 50, 5000, 10, 100.0), Outcome::Admitted);
    }
    for _ in 0..2 {
        assert_eq!(outcome(&t, "small", 50, 0, 10, 100.0), Outcome::Admitted);
    }
    assert_eq!(outcome(&t, "small", 50, 0, 10, 100.0), Outcome::Exact);
    let mut drained = drain(&t, 101.0);
    drained.sort_by(|x, y| x.scope.cmp(&y.scope));
    assert_eq!(
        drained,
        vec![
            // Wants 2*3+1 requests and 2*30+10 tokens; holds 97 and 970.
            delta("big", 100, (-90, -900), (0, 0), (50, 5000)),
            // Spent its lease: wants 2*2+1 requests; the tokens had no limit.
            delta("small", 100, (0, 20), (5, 0), (50, 0)),
        ]
    );
    assert_eq!(t.take("big"), Some((100, -7, -70)));
    assert_eq!(t.take("small"), Some((100, 0, 0)));
}

#[test]
fn a_scope_whose_lease_lasts_is_not_synced_until_it_runs_low() {
    let t = table();
    // rpm 10,000: the cap of a sixteenth (625) does not bind here.
    assert!(lease(&t, "u", 100, (20, 0), 100.0));
    let limits = (10_000, 0);
    let use_twice = || {
        for _ in 0..2 {
            assert_eq!(outcome(&t, "u", 10_000, 0, 0, 100.0), Outcome::Admitted);
        }
    };
    // 2 a drain with 20 held: 18 left covers two more drains (4 + 1), so no sync.
    use_twice();
    assert_eq!(t.drain(100.0, W, 100, 10), vec![]);
    for _ in 0..6 {
        use_twice();
        assert_eq!(t.drain(100.0, W, 100, 10), vec![]);
    }
    // 14 used over 7 drains; 6 held, then 4 after this drain: below 2 * 2 + 1, so it is
    // settled and asks for 11 drains at 2 (22) plus the floor, holding 4.
    use_twice();
    assert_eq!(
        t.drain(100.0, W, 100, 10),
        vec![delta("u", 100, (0, 0), (19, 0), limits)]
    );
    assert_eq!(t.take("u"), Some((100, -4, 0)));
}

#[test]
fn a_paced_scope_is_settled_after_lease_drains_even_with_lease_left() {
    let t = table();
    assert!(lease(&t, "u", 100, (50, 0), 100.0));
    assert_eq!(outcome(&t, "u", 10_000, 0, 0, 100.0), Outcome::Admitted);
    for _ in 0..2 {
        assert_eq!(t.drain(100.0, W, 100, 3), vec![]);
    }
    // Third drain: one request over 3 drains; wants ceil(1 * 4 / 3) + 1 = 3 of the 49 held.
    assert_eq!(
        t.drain(100.0, W, 100, 3),
        vec![delta("u", 100, (-46, 0), (0, 0), (10_000, 0))]
    );
}

#[test]
fn a_paced_lease_beyond_two_drains_is_capped_at_a_sixteenth_of_the_limit() {
    let t = table();
    assert!(lease(&t, "v", 100, (30, 0), 100.0));
    for _ in 0..30 {
        assert_eq!(outcome(&t, "v", 160, 0, 0, 100.0), Outcome::Admitted);
    }
    // 30 used in one drain: 51 drains would be 1,530; capped at max(2 * 30, 160 / 16) + 1.
    assert_eq!(
        t.drain(100.0, W, 100, 50),
        vec![delta("v", 100, (0, 0), (61, 0), (160, 0))]
    );
}

#[test]
fn a_tokens_only_charge_checks_the_token_limit_and_counts_no_request() {
    let t = table();
    assert!(lease(&t, "k", 100, (5, 40), 100.0));
    let tokens_only = |tokens| Request {
        requests: 0,
        ..request(tokens, 100.0)
    };
    // rpm 5 is already fully leased: a request would be the 6th, a tokens-only charge is not.
    assert_eq!(
        one(&t, "k", 5, 100, &request(0, 100.0)).outcome,
        Outcome::Admitted
    );
    let d = one(&t, "k", 5, 100, &tokens_only(30));
    assert_eq!(d.outcome, Outcome::Admitted);
    assert_eq!(t.take("k"), Some((100, -4, -10)));
    // The lease spent, a tokens-only charge that fits the limit goes to Redis...
    assert!(t.restore("k", 100, -4, -10, 100.0, W));
    assert_eq!(
        one(&t, "k", 5, 100, &tokens_only(20)).outcome,
        Outcome::Exact
    );
    // ...and one past the limit (30 spent of 100, the lease counted as spent) is denied.
    assert_eq!(
        one(&t, "k", 5, 100, &tokens_only(71)).outcome,
        Outcome::Denied
    );
    assert_eq!(t.take("k"), Some((100, -4, -10)));
}

#[test]
fn take_keeping_a_lease_gives_up_only_charges() {
    let t = table();
    assert!(lease(&t, "k", 100, (5, 40), 100.0));
    assert!(t.restore("k", 100, 9, 0, 100.0, W));
    // Requests: 9 charged over a lease of 5 (+4); tokens: a lease of 40 (-40).
    assert_eq!(t.take_keeping("k", (true, true)), Some((100, 4, 0)));
    assert_eq!(t.take_keeping("k", (false, true)), Some((100, 0, 0)));
    assert_eq!(t.take_keeping("k", (true, false)), Some((100, 0, -40)));
    assert_eq!(t.take("k"), Some((100, 0, 0)));
}

#[test]
fn a_tokens_only_charge_on_a_stale_scope_waits_for_redis() {
    let t = table();
    assert!(apply(&t, "k", 100, 0, 0, 100.0));
    assert!(t.drain(100.0, W, 1, 1).is_empty());
    assert!(t.drain(100.0, W, 1, 1).is_empty());
    assert_eq!(t.stats().active, 0);
    let tokens_only = Request {
        requests: 0,
        ..request(10, 100.0)
    };
    assert_eq!(one(&t, "k", 0, 100, &tokens_only).outcome, Outcome::Load);
    assert_eq!(
        one(&t, "k", 0, 100, &request(10, 100.0)).outcome,
        Outcome::Admitted
    );
}

#[test]
fn idle_scope_releases_its_lease_then_goes_stale() {
    let t = table();
    assert!(lease(&t, "u", 100, (5, 0), 100.0));
    assert_eq!(outcome(&t, "u", 10, 0, 0, 100.0), Outcome::Admitted);
    let limits = (10, 0);
    // Used: keeps 2*1+1.
    assert_eq!(
        t.drain(100.0, W, 2, 1),
        vec![delta("u", 100, (-1, 0), (0, 0), limits)]
    );
    // Idle once: keeps the floor of one request.
    assert_eq!(
        t.drain(100.0, W, 2, 1),
        vec![delta("u", 100, (-2, 0), (0, 0), limits)]
    );
    // Idle twice: gives everything back.
    assert_eq!(
        t.drain(100.0, W, 2, 1),
        vec![delta("u", 100, (-1, 0), (0, 0), limits)]
    );
    assert_eq!(t.stats().active, 1);
    assert_eq!(t.drain(100.0, W, 2, 1), vec![]);
    assert_eq!(t.stats().active, 0);
    assert_eq!(t.take("u"), None);
    assert_eq!(
        outcome(&t, "u", 10, 0, 0, 100.0),
        Outcome::Admitted,
        "trust"
    );
    assert_eq!(outcome(&t, "u", 10, 0, 0, 100.0), Outcome::Load);
}

#[test]
fn drain_drops_records_whose_window_ended() {
    let t = table();
    assert!(lease(&t, "u", 100, (5, 50), 100.0));
    assert_eq!(outcome(&t, "u", 10, 100, 5, 100.0), Outcome::Admitted);
    assert_eq!(
        drain(&t, 160.0),
        vec![],
        "Redis dropped the window and lease"
    );
    assert_eq!(t.stats().active, 0);
    assert_eq!(t.take("u"), None);
}

#[test]
fn offline_starts_a_local_window_and_never_loads() {
    let t = table();
    let req = Request {
        requests: 1,
        offline: true,
        proxies: 2,
        ..request(0, 100.7)
    };
    for _ in 0..5 {
        assert_eq!(one(&t, "user:u", 10, 0, &req).outcome, Outcome::Admitted);
    }
    let d = one(&t, "user:u", 10, 0, &req);
    assert_eq!(d.outcome, Outcome::Denied);
    assert!((d.retry_after - 59.3).abs() < 1e-9);
    assert_eq!(t.take("user:u"), Some((100, 5, 0)));

    let later = Request { now: 161.0, ..req };
    assert_eq!(one(&t, "user:u", 10, 0, &later).outcome, Outcome::Admitted);
    assert_eq!(t.take("user:u"), Some((161, 1, 0)));
}

#[test]
fn offline_ignores_staleness_and_the_lease() {
    let t = table();
    assert!(apply(&t, "user:u", 100, 10, 0, 100.0));
    drain(&t, 100.0);
    assert!(apply(&t, "team:t", 100, 10, 0, 100.0));
    let req = Request {
        requests: 1,
        offline: true,
        ..request(0, 100.0)
    };
    for _ in 0..3 {
        assert_eq!(one(&t, "user:u", 100, 0, &req).outcome, Outcome::Admitted);
        assert_eq!(one(&t, "team:t", 100, 0, &req).outcome, Outcome::Admitted);
    }
    assert_eq!(t.take("user:u"), Some((100, 3, 0)));
    assert_eq!(t.take("team:t"), Some((100, 3, 0)));
}

#[test]
fn offline_denies_a_scope_it_cannot_track() {
    let t = Table::with_key(1, 1, (1, 2)).expect("valid configuration");
    assert!(apply(&t, "a", 100, 0, 0, 100.0));
    // A correction not yet pushed: "a" may not be evicted.
    assert!(t.record("a", 5, 100.0, W));
    let req = Request {
        requests: 1,
        offline: true,
        ..request(0, 100.0)
    };
    let d = one(&t, "b", 10, 0, &req);
    assert_eq!(d, Decision::not_admitted(Outcome::Denied, 0, 1.0));
    assert_eq!(t.stats().rejected, 1);
}

#[test]
fn apply_of_a_newer_window_drops_pending_of_an_ended_window() {
    let t = table();
    assert!(lease(&t, "u", 100, (5, 0), 100.0));
    assert_eq!(outcome(&t, "u", 100, 0, 0, 100.0), Outcome::Admitted);
    assert!(apply(&t, "u", 160, 5, 0, 160.0));
    assert_eq!(t.take("u"), Some((160, 0, 0)));
    assert!(lease(&t, "u", 160, (2, 0), 160.0));
    assert_eq!(t.take("u"), Some((160, -2, 0)));
}

#[test]
fn apply_of_another_open_window_keeps_pending_of_an_open_window() {
    let t = table();
    let offline = Request {
        requests: 1,
        offline: true,
        ..request(0, 100.0)
    };
    for _ in 0..2 {
        assert_eq!(one(&t, "u", 10, 0, &offline).outcome, Outcome::Admitted);
    }
    // Redis's open window wins over the local one; the charges move to it.
    let totals = Totals {
        window_start: 90,
        requests: 5,
        lease_requests: 3,
        ..Totals::default()
    };
    assert!(t.apply("u", &totals, 101.0, W));
    assert_eq!(t.take("u"), Some((90, -1, 0)));
}

#[test]
fn apply_of_an_older_window_is_ignored() {
    let t = table();
    let newer = Totals {
        window_start: 160,
        requests: 5,
        lease_requests: 3,
        ..Totals::default()
    };
    assert!(t.apply("u", &newer, 160.0, W));
    let older = Totals {
        window_start: 100,
        requests: 50,
        lease_requests: 7,
        ..Totals::default()
    };
    assert!(t.apply("u", &older, 160.0, W));
    let d = one(&t, "u", 10, 0, &request(0, 160.0));
    assert_eq!(d.outcome, Outcome::Admitted);
    assert_eq!(d.remaining_requests, 7);
    assert_eq!(t.take("u"), Some((160, -2, 0)));
}

#[test]
fn apply_rejects_a_scope_when_every_tracked_scope_has_a_delta_to_push() {
    let t = Table::with_key(4, 1, (1, 2)).expect("valid configuration");
    for name in ["a", "b", "c", "d"] {
        assert!(apply(&t, name, 100, 0, 0, 100.0));
        assert!(t.record(name, 1, 100.0, W));
    }
    assert!(!apply(&t, "e", 100, 0, 0, 100.0));
    assert_eq!(t.stats().rejected, 1);
    assert_eq!(t.len(), 4);

    drain(&t, 100.0);
    assert!(apply(&t, "e", 100, 0, 0, 100.0));
    assert_eq!(t.len(), 4);
    assert_eq!(t.stats().evictions, 1);
}

#[test]
fn a_full_shard_evicts_a_scope_holding_only_a_lease_rather_than_refuse() {
    let t = Table::with_key(2, 1, (1, 2)).expect("valid configuration");
    assert!(lease(&t, "leased", 100, (5, 0), 100.0));
    assert!(apply(&t, "charged", 100, 0, 0, 100.0));
    assert!(t.record("charged", 3, 100.0, W));
    // Both are active; only the lease holder has nothing to push.
    assert!(apply(&t, "new", 100, 0, 0, 100.0));
    assert_eq!(t.stats().evictions, 1);
    assert_eq!(t.take("leased"), None);
    assert_eq!(t.take("charged"), Some((100, 0, 3)));
}

#[test]
fn a_full_shard_evicts_an_ended_idle_scope_first() {
    let t = Table::with_key(3, 1, (1, 2)).expect("valid configuration");
    assert!(apply(&t, "old", 10, 0, 0, 100.0));
    assert!(apply(&t, "idle", 100, 0, 0, 100.0));
    assert!(apply(&t, "busy", 100, 0, 0, 100.0));
    drain(&t, 100.0);
    assert_eq!(outcome(&t, "busy", 10, 0, 0, 100.0), Outcome::Admitted);
    assert!(apply(&t, "new", 100, 0, 0, 100.0));
    assert_eq!(t.take("old"), None);
    assert_eq!(outcome(&t, "old", 10, 0, 0, 100.0), Outcome::Load);
    assert_eq!(outcome(&t, "idle", 10, 0, 0, 100.0), Outcome::Admitted);
    assert_eq!(t.take("busy"), Some((100, 1, 0)));
}

#[test]
fn drain_keeps_touched_records_and_drops_idle_ones() {
    let t = table();
    assert!(apply(&t, "u", 100, 0, 0, 100.0));
    assert_eq!(outcome(&t, "u", 0, 0, 3, 100.0), Outcome::Admitted);
    assert_eq!(t.stats().pending, 1);
    assert_eq!(
        drain(&t, 100.0),
        vec![delta("u", 100, (1, 3), (0, 0), (0, 0))]
    );
    assert_eq!(t.stats().active, 1);
    assert_eq!(t.stats().pending, 0);
    assert_eq!(drain(&t, 100.0), vec![]);
    assert_eq!(t.stats().active, 0);
    assert_eq!(t.take("u"), None);
}

#[test]
fn a_touched_scope_is_synced_with_nothing_to_push() {
    let t = table();
    assert!(apply(&t, "u", 100, 0, 0, 100.0));
    assert!(t.record("u", 0, 100.0, W));
    assert_eq!(
        drain(&t, 100.0),
        vec![delta("u", 100, (0, 0), (0, 0), (0, 0))]
    );
}

#[test]
fn take_and_restore_give_back_a_delta_of_the_same_open_window() {
    let t = table();
    assert!(apply(&t, "u", 100, 0, 0, 100.0));
    assert_eq!(outcome(&t, "u", 0, 0, 4, 100.0), Outcome::Admitted);
    assert_eq!(t.take("u"), Some((100, 1, 4)));
    assert_eq!(t.take("u"), Some((100, 0, 0)));
    assert!(t.restore("u", 100, 1, 4, 120.0, W));
    assert!(!t.restore("u", 99, 1, 4, 120.0, W), "another window");
    assert!(!t.restore("u", 100, 1, 4, 160.0, W), "window ended");
    assert!(!t.restore("x", 100, 1, 4, 120.0, W), "not tracked");
    assert_eq!(t.take("u"), Some((100, 1, 4)));
    assert_eq!(t.take("x"), None);
}

#[test]
fn restore_recreates_a_record_that_drain_removed() {
    let t = table();
    assert!(apply(&t, "u", 100, 0, 0, 100.0));
    drain(&t, 100.0);
    assert!(t.restore("u", 100, 2, 9, 100.0, W));
    assert_eq!(t.stats().active, 1);
    assert_eq!(
        outcome(&t, "u", 10, 0, 0, 100.0),
        Outcome::Load,
        "restored, still stale"
    );
    assert_eq!(
        drain(&t, 100.0),
        vec![delta("u", 100, (2, 9), (0, 0), (0, 0))]
    );
}

#[test]
fn record_adds_a_signed_token_correction_to_an_open_window() {
    let t = table();
    assert!(!t.record("u", 5, 100.0, W));
    assert!(apply(&t, "u", 100, 0, 0, 100.0));
    assert!(t.record("u", -7, 100.0, W));
    assert!(t.record("u", 2, 100.0, W));
    assert!(!t.record("u", 2, 160.0, W));
    assert_eq!(t.take("u"), Some((100, 0, -5)));
}

#[test]
fn extreme_values_saturate_instead_of_panicking() {
    let t = table();
    let max = f64::from(u32::MAX);
    let totals = Totals {
        window_start: u32::MAX,
        requests: u32::MAX,
        tokens: u32::MAX,
        lease_requests: u32::MAX,
        lease_tokens: u32::MAX,
    };
    assert!(t.apply("u", &totals, max, 1));
    assert!(t.apply("u", &totals, max, 1));
    assert!(t.record("u", i64::MAX, max, 1));
    assert!(t.record("u", i64::MAX, max, 1));
    assert!(t.restore("u", u32::MAX, i64::MAX, i64::MIN, max, 1));
    let req = Request {
        requests: 1,
        tokens: u32::MAX,
        now: max,
        window: u32::MAX,
        proxies: u32::MAX,
        offline: false,
    };
    for (rpm, tpm) in [(0, 0), (u32::MAX, 0), (0, u32::MAX), (1, 1)] {
        one(&t, "u", rpm, tpm, &req);
        one(
            &t,
            "u",
            rpm,
            tpm,
            &Request {
                requests: 1,
                offline: true,
                ..req
            },
        );
    }
    assert!(t.record("u", i64::MIN, max, 1));
    for idle in [u32::MAX, 0] {
        t.drain(max, u32::MAX, idle, 1);
    }
    t.stats();
    t.evict(max, u32::MAX, usize::MAX);
}

#[test]
fn evict_removes_only_idle_scopes_whose_window_ended() {
    let t = table();
    assert!(apply(&t, "ended", 100, 0, 0, 100.0));
    assert!(apply(&t, "open", 150, 0, 0, 150.0));
    assert!(apply(&t, "active", 100, 0, 0, 100.0));
    drain(&t, 150.0);
    assert!(apply(&t, "active", 100, 0, 0, 100.0));
    assert_eq!(t.evict(170.0, W, 100), 1);
    assert_eq!(t.len(), 2);
    assert_eq!(t.stats().evictions, 1);
    assert_eq!(t.evict(170.0, W, 100), 0);
}

#[test]
fn evict_does_bounded_work_and_resumes() {
    let t = Table::with_key(10_000, 8, (1, 2)).expect("valid configuration");
    for i in 0..1000 {
        assert!(apply(&t, &format!("s{i}"), 100, 0, 0, 100.0));
    }
    drain(&t, 100.0);
    let mut total = 0;
    loop {
        let n = t.evict(200.0, W, 10);
        assert!(n <= 10);
        if n == 0 && t.is_empty() {
            break;
        }
        total += n;
    }
    assert_eq!(total, 1000);
    assert_eq!(t.stats().scopes, 0);
}

#[test]
fn a_flood_of_scopes_stays_under_the_cap_and_keeps_active_scopes() {
    let max = 1000;
    let t = Table::with_key(max, 8, (3, 4)).expect("valid configuration");
    let hot: Vec<String> = (0..50).map(|i| format!("hot:{i}")).collect();
    for name in &hot {
        assert!(apply(&t, name, 100, 0, 0, 100.0));
    }
    let mut rejected = 0;
    for batch in 0..100 {
        for i in 0..100 {
            if !apply(&t, &format!("flood:{batch}:{i}"), 100, 0, 0, 100.0) {
                rejected += 1;
            }
            assert!(t.len() <= max as usize);
        }
        for name in &hot {
            assert_eq!(outcome(&t, name, 0, 0, 1, 100.0), Outcome::Admitted);
        }
        drain(&t, 100.0);
    }
    assert_eq!(rejected, 0);
    assert_eq!(t.stats().scopes, t.len() as u64);
    assert!(t.stats().evictions >= 10_000 + 50 - max);
    for name in &hot {
        assert!(t.take(name).is_some(), "{name} was evicted");
    }
}

#[test]
fn memory_per_idle_scope_stays_small() {
    let n: u32 = 200_000;
    let t = Table::with_key(u64::from(n), 1, (5, 6)).expect("valid configuration");
    for i in 0..n {
        assert!(apply(&t, &format!("api_key:{i:032x}"), 100, 0, 0, 100.0));
        if i % 10_000 == 9_999 {
            drain(&t, 100.0);
        }
    }
    drain(&t, 100.0);
    let stats = t.stats();
    assert_eq!(stats.scopes, u64::from(n));
    assert_eq!(stats.active, 0);
    let per_scope = stats.memory_bytes as f64 / f64::from(n);
    assert!(per_scope <= 32.0, "{per_scope} bytes per scope");
    assert_eq!(t.memory_bytes(), stats.memory_bytes);
}

#[test]
fn memory_bytes_counts_active_records_as_stats_does() {
    let t = Table::with_key(1000, 4, (9, 10)).expect("valid configuration");
    for i in 0..300 {
        assert!(apply(&t, &format!("user:{i}"), 100, 0, 0, 100.0));
    }
    let stats = t.stats();
    assert_eq!(stats.active, 300);
    assert_eq!(t.memory_bytes(), stats.memory_bytes);
}

#[test]
fn index_survives_many_inserts_and_removals() {
    let t = Table::with_key(512, 1, (7, 8)).expect("valid configuration");
    for round in 0..20u32 {
        let now = f64::from(round * 100);
        for i in 0..500 {
            assert!(apply(&t, &format!("{round}:{i}"), round * 100, i, 0, now));
        }
        drain(&t, now);
        for i in 0..500 {
            let d = one(&t, &format!("{round}:{i}"), 1000, 0, &request(0, now));
            assert_eq!(d.outcome, Outcome::Admitted);
            assert_eq!(d.remaining_requests, i64::from(1000 - i - 1));
        }
        drain(&t, now);
        drain(&t, now);
        assert_eq!(t.evict(now + 100.0, W, 200), 200);
    }
}

// ---------------------------------------------------------------------------------------------
// Reference model: a port of `tests/reference_table.py`.

#[derive(Clone, Debug, Default)]
struct RefRecord {
    pend_req: i64,
    pend_tok: i64,
    used_req: i64,
    used_tok: i64,
    lim_req: u32,
    lim_tok: u32,
    last_tokens: u32,
    idle: u32,
    unsettled: u32,
    fresh: bool,
    touched: bool,
}

#[derive(Clone, Debug)]
struct RefState {
    ws: u32,
    g_req: u32,
    g_tok: u32,
    rec: Option<RefRecord>,
}

#[derive(Default, Debug)]
struct Model {
    scopes: HashMap<String, RefState>,
}

impl RefState {
    fn open(&self, now: f64, window: u32) -> bool {
        now < f64::from(self.ws) + f64::from(window)
    }
}

/// `(push, extra lease to ask for, new pending)` for one kind at a drain.
fn ref_settle(pend: i64, want: i64) -> (i64, i64, i64) {
    let (mut push, mut held) = if pend > 0 { (pend, 0) } else { (0, -pend) };
    if held > want {
        push -= held - want;
        held = want;
    }
    (push, want - held, -held)
}

type RefDelta = (String, u32, i64, i64, u32, u32, u32, u32);

impl Model {
    /// Ranks: 0 denied, 1 load, 2 exact, 3 admitted.
    /// `(rank, retry, left_requests, left_tokens)`; what is left only for an over-limit denial.
    fn verdict(st: &RefState, rpm: u32, tpm: u32, req: &Request) -> (u8, f64, i64, i64) {
        let (pr, pt) = st
            .rec
            .as_ref()
            .map_or((0, 0), |r| (i128::from(r.pend_req), i128::from(r.pend_tok)));
        let (lr, lt) = (i128::from(rpm), i128::from(tpm));
        let (gr, gt) = (i128::from(st.g_req), i128::from(st.g_tok));
        let t = i128::from(req.tokens);
        let p = i128::from(req.proxies);
        let retry = f64::from(st.ws) + f64::from(req.window) - req.now;
        if (lr > 0 && gr + pr + 1 > lr) || (lt > 0 && gt + pt + t.max(1) > lt) {
            let left = |l: i128, used: i128| if l > 0 { (l - used).max(0) as i64 } else { -1 };
            return (0, retry, left(lr, gr + pr), left(lt, gt + pt));
        }
        if req.offline {
            let spent = (lr > 0 && pr + 1 > (lr - gr).div_euclid(p))
                || (lt > 0 && pt + t > (lt - gt).div_euclid(p));
            return if spent {
                (0, retry, -1, -1)
            } else {
                (3, 0.0, -1, -1)
            };
        }
        match &st.rec {
            Some(r) if r.fresh && ((lr > 0 && pr + 1 > 0) || (lt > 0 && pt + t > 0)) => {
                (2, 0.0, -1, -1)
            }
            Some(r) if r.fresh => (3, 0.0, -1, -1),
            Some(_) if pr != 0 => (1, 0.0, -1, -1),
            _ => (3, 0.0, -1, -1),
        }
    }

    fn check(&mut self, scopes: &[(String, u32, u32)], req: &Request) -> Decision {
        if req.offline {
            for (name, _, _) in scopes {
                let start = req.now.floor() as u32;
                let st = self.scopes.entry(name.clone()).or_insert(RefState {
                    ws: start,
                    g_req: 0,
                    g_tok: 0,
                    rec: None,
                });
                if !st.open(req.now, req.window) {
                    // A local window, as while Redis is unreachable.
                    st.ws = start;
                    st.g_req = 0;
                    st.g_tok = 0;
                    if let Some(r) = st.rec.as_mut() {
                        r.pend_req = 0;
                        r.pend_tok = 0;
                    }
                }
            }
        }

        let mut worst: Option<(usize, (u8, f64, i64, i64))> = None;
        for (i, (name, rpm, tpm)) in scopes.iter().enumerate() {
            let v = match self.scopes.get(name) {
                Some(st) if st.open(req.now, req.window) => Self::verdict(st, *rpm, *tpm, req),
                _ => (1, 0.0, -1, -1),
            };
            if worst.is_none_or(|(_, w)| v.0 < w.0) {
                worst = Some((i, v));
            }
        }
        match worst {
            Some((i, (0, retry, left_req, left_tok))) => {
                return Decision {
                    remaining_requests: left_req,
                    remaining_tokens: left_tok,
                    ..Decision::not_admitted(Outcome::Denied, i, retry)
                };
            }
            Some((i, (1, ..))) => return Decision::not_admitted(Outcome::Load, i, 0.0),
            Some((i, (2, ..))) => return Decision::not_admitted(Outcome::Exact, i, 0.0),
            _ => {}
        }

        let (mut left_r, mut left_t) = (None::<i64>, None::<i64>);
        for (name, rpm, tpm) in scopes {
            let st = self.scopes.get_mut(name).expect("checked above");
            let rec = st.rec.get_or_insert_with(RefRecord::default);
            rec.pend_req += 1;
            rec.pend_tok += i64::from(req.tokens);
            rec.used_req += 1;
            rec.used_tok += i64::from(req.tokens);
            rec.lim_req = *rpm;
            if *tpm > 0 || req.tokens > 0 {
                (rec.lim_tok, rec.last_tokens) = (*tpm, req.tokens);
            }
            rec.touched = true;
            if *rpm > 0 {
                let v = (i64::from(*rpm) - i64::from(st.g_req) - rec.pend_req).max(0);
                left_r = Some(left_r.map_or(v, |l| l.min(v)));
            }
            if *tpm > 0 {
                let v = (i64::from(*tpm) - i64::from(st.g_tok) - rec.pend_tok).max(0);
                left_t = Some(left_t.map_or(v, |l| l.min(v)));
            }
        }
        Decision {
            outcome: Outcome::Admitted,
            index: None,
            remaining_requests: left_r.unwrap_or(-1),
            remaining_tokens: left_t.unwrap_or(-1),
            retry_after: 0.0,
        }
    }

    fn apply(&mut self, name: &str, totals: &Totals, now: f64, window: u32) -> bool {
        let st = self.scopes.entry(name.to_owned()).or_insert(RefState {
            ws: totals.window_start,
            g_req: 0,
            g_tok: 0,
            rec: None,
        });
        let mut reset = false;
        if totals.window_start != st.ws {
            if now >= f64::from(totals.window_start) + f64::from(window) {
                return true;
            }
            reset = !st.open(now, window);
            st.ws = totals.window_start;
        }
        st.g_req = totals.requests;
        st.g_tok = totals.tokens;
        let rec = st.rec.get_or_insert_with(RefRecord::default);
        if reset {
            rec.pend_req = 0;
            rec.pend_tok = 0;
        }
        rec.pend_req -= i64::from(totals.lease_requests);
        rec.pend_tok -= i64::from(totals.lease_tokens);
        rec.fresh = true;
        true
    }

    fn drain(
        &mut self,
        now: f64,
        window: u32,
        idle_drains: u32,
        lease_drains: u32,
    ) -> Vec<RefDelta> {
        let mut out = Vec::new();
        for (name, st) in &mut self.scopes {
            let open = st.open(now, window);
            let Some(rec) = st.rec.as_mut() else {
                continue;
            };
            if !open {
                st.rec = None;
                continue;
            }
            let touched = rec.touched;
            rec.idle = if touched { 0 } else { rec.idle + 1 };
            rec.touched = false;
            let releasing = rec.idle >= idle_drains;
            let drains = i128::from(rec.unsettled + 1);
            // Use since the last settle, at `n` drains of its pace, rounded up.
            let at = |used: i64, n: u32| -> i64 {
                let used = i128::from(used.max(0));
                ((used * i128::from(n) + drains - 1) / drains) as i64
            };
            let low = |limit: u32, pend: i64, used: i64, floor: u32| {
                limit > 0 && (pend > 0 || -pend < at(used, 2) + i64::from(floor))
            };
            let due = releasing
                || drains >= i128::from(lease_drains)
                || low(rec.lim_req, rec.pend_req, rec.used_req, 1)
                || low(rec.lim_tok, rec.pend_tok, rec.used_tok, rec.last_tokens);
            if !due {
                rec.unsettled += 1;
                continue;
            }
            rec.unsettled = 0;
            let want = |limit: u32, used: i64, floor: u32| {
                if releasing || limit == 0 {
                    0
                } else {
                    let cap = at(used, 2).max(i64::from(limit.div_ceil(16)));
                    at(used, lease_drains + 1).min(cap) + i64::from(floor)
                }
            };
            let want_r = want(rec.lim_req, rec.used_req, 1);
            let want_t = want(rec.lim_tok, rec.used_tok, rec.last_tokens);
            rec.used_req = 0;
            rec.used_tok = 0;
            let (push_r, top_r, pend_r) = ref_settle(rec.pend_req, want_r);
            let (push_t, top_t, pend_t) = ref_settle(rec.pend_tok, want_t);
            (rec.pend_req, rec.pend_tok) = (pend_r, pend_t);
            if touched || push_r != 0 || push_t != 0 || top_r != 0 || top_t != 0 {
                out.push((
                    name.clone(),
                    st.ws,
                    push_r,
                    push_t,
                    top_r as u32,
                    top_t as u32,
                    rec.lim_req,
                    rec.lim_tok,
                ));
            } else if releasing {
                st.rec = None;
            }
        }
        out.sort();
        out
    }

    fn take(&mut self, name: &str) -> Option<(u32, i64, i64)> {
        let st = self.scopes.get_mut(name)?;
        let rec = st.rec.as_mut()?;
        let out = (st.ws, rec.pend_req, rec.pend_tok);
        rec.pend_req = 0;
        rec.pend_tok = 0;
        Some(out)
    }

    fn add(&mut self, name: &str, want: Option<u32>, r: i64, t: i64, now: f64) -> bool {
        let Some(st) = self.scopes.get_mut(name) else {
            return false;
        };
        if !st.open(now, W) || want.is_some_and(|ws| ws != st.ws) {
            return false;
        }
        let rec = st.rec.get_or_insert_with(RefRecord::default);
        rec.pend_req = rec.pend_req.saturating_add(r);
        rec.pend_tok = rec.pend_tok.saturating_add(t);
        if want.is_none() {
            rec.used_tok = rec.used_tok.saturating_add(t);
        }
        rec.touched = true;
        true
    }

    fn evict(&mut self, now: f64) -> usize {
        let before = self.scopes.len();
        self.scopes
            .retain(|_, st| st.rec.is_some() || st.open(now, W));
        before - self.scopes.len()
    }

    fn pending(&self) -> u64 {
        self.scopes
            .values()
            .filter(|st| {
                st.rec
                    .as_ref()
                    .is_some_and(|r| r.pend_req != 0 || r.pend_tok != 0)
            })
            .count() as u64
    }
}

#[derive(Clone, Debug)]
enum Op {
    Check {
        scopes: Vec<(usize, u32, u32)>,
        tokens: u32,
        proxies: u32,
        offline: bool,
    },
    Apply {
        scope: usize,
        age: u32,
        totals: Totals,
    },
    Drain(u32, u32),
    Take(usize),
    Restore {
        scope: usize,
        age: u32,
        requests: i64,
        tokens: i64,
    },
    Record(usize, i64),
    Evict,
    Advance(u32),
}

const NAMES: [&str; 5] = ["api_key:a", "user:u", "team:t", "end_user:e", "model:m"];

fn op() -> impl Strategy<Value = Op> {
    let scope = 0..NAMES.len();
    prop_oneof![
        6 => (
            proptest::sample::subsequence((0..NAMES.len()).collect::<Vec<_>>(), 1..=3),
            proptest::collection::vec((0u32..12, 0u32..30), 3),
            0u32..7,
            1u32..4,
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(idx, limits, tokens, proxies, offline)| Op::Check {
                scopes: idx
                    .into_iter()
                    .zip(limits)
                    .map(|(i, (r, t))| (i, r, t))
                    .collect(),
                tokens,
                proxies,
                offline,
            }),
        3 => (scope.clone(), 0u32..4, 0u32..10, 0u32..25, 0u32..5, 0u32..20).prop_map(
            |(scope, age, requests, tokens, lease_requests, lease_tokens)| Op::Apply {
                scope,
                age,
                totals: Totals {
                    window_start: 0,
                    requests: requests + lease_requests,
                    tokens: tokens + lease_tokens,
                    lease_requests,
                    lease_tokens,
                },
            }
        ),
        2 => (0u32..4, 1u32..6).prop_map(|(idle, lease)| Op::Drain(idle, lease)),
        1 => scope.clone().prop_map(Op::Take),
        1 => (scope.clone(), 0u32..4, -3i64..4, -20i64..20).prop_map(
            |(scope, age, requests, tokens)| Op::Restore {
                scope,
                age,
                requests,
                tokens
            }
        ),
        1 => (scope, -20i64..20).prop_map(|(s, t)| Op::Record(s, t)),
        1 => Just(Op::Evict),
        2 => (0u32..80).prop_map(Op::Advance),
    ]
}

/// Window starts on a 20-second grid, so that applies often hit the same window.
fn window_start(now: f64, age: u32) -> u32 {
    (now as u32 / 20 * 20).saturating_sub(20 * age)
}

fn sorted(deltas: Vec<Delta>) -> Vec<RefDelta> {
    let mut out: Vec<_> = deltas
        .into_iter()
        .map(|d| {
            (
                d.scope.to_string(),
                d.window_start,
                d.requests,
                d.tokens,
                d.want_requests,
                d.want_tokens,
                d.rpm,
                d.tpm,
            )
        })
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn matches_the_reference_model(ops in proptest::collection::vec(op(), 1..120)) {
        let t = Table::with_key(1000, 2, (9, 10)).expect("valid configuration");
        let mut m = Model::default();
        let mut now = 1000.0_f64;
        for op in ops {
            match op {
                Op::Check { scopes, tokens, proxies, offline } => {
                    let owned: Vec<(String, u32, u32)> = scopes
                        .iter()
                        .map(|&(i, r, tt)| (NAMES[i].to_owned(), r, tt))
                        .collect();
                    let limits: Vec<ScopeLimit<'_>> = owned
                        .iter()
                        .map(|(n, r, tt)| ScopeLimit { name: n, rpm: *r, tpm: *tt })
                        .collect();
                    let req = Request { requests: 1, tokens, now, window: W, proxies, offline };
                    prop_assert_eq!(t.check(&limits, &req), m.check(&owned, &req));
                }
                Op::Apply { scope, age, totals } => {
                    let totals = Totals { window_start: window_start(now, age), ..totals };
                    prop_assert_eq!(
                        t.apply(NAMES[scope], &totals, now, W),
                        m.apply(NAMES[scope], &totals, now, W)
                    );
                }
                Op::Drain(idle, lease) => {
                    prop_assert_eq!(
                        sorted(t.drain(now, W, idle, lease)),
                        m.drain(now, W, idle, lease)
                    );
                }
                Op::Take(s) => prop_assert_eq!(t.take(NAMES[s]), m.take(NAMES[s])),
                Op::Restore { scope, age, requests, tokens } => {
                    let ws = window_start(now, age);
                    prop_assert_eq!(
                        t.restore(NAMES[scope], ws, requests, tokens, now, W),
                        m.add(NAMES[scope], Some(ws), requests, tokens, now)
                    );
                }
                Op::Record(s, tokens) => prop_assert_eq!(
                    t.record(NAMES[s], tokens, now, W),
                    m.add(NAMES[s], None, 0, tokens, now)
                ),
                Op::Evict => prop_assert_eq!(t.evict(now, W, usize::MAX), m.evict(now)),
                Op::Advance(half_seconds) => now += f64::from(half_seconds) / 2.0,
            }
            let stats = t.stats();
            prop_assert_eq!(stats.scopes, m.scopes.len() as u64);
            prop_assert_eq!(t.len(), m.scopes.len());
            prop_assert_eq!(
                stats.active,
                m.scopes.values().filter(|s| s.rec.is_some()).count() as u64
            );
            prop_assert_eq!(stats.pending, m.pending());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrency.

#[test]
fn concurrent_checks_never_pass_the_lease_and_charge_all_or_nothing() {
    let t = Arc::new(Table::with_key(1000, 4, (11, 12)).expect("valid configuration"));
    // (name, rpm, tpm, lease of requests, lease of tokens); the fleet counted 100 requests and
    // 1000 tokens of other proxies besides the lease.
    let scopes = [
        ("a", 10_000u32, 0u32, 900u32, 0u32),
        ("b", 10_000, 0, 700, 0),
        ("c", 0, 100_000, 0, 6000),
        ("d", 600, 6000, 500, 5000),
    ];
    for (name, _, _, lr, lt) in scopes {
        let totals = Totals {
            window_start: 100,
            requests: 100 + lr,
            tokens: 1000 + lt,
            lease_requests: lr,
            lease_tokens: lt,
        };
        assert!(t.apply(name, &totals, 100.0, W));
    }
    let combos: [&[usize]; 5] = [&[0, 1], &[0], &[1, 2], &[2, 3, 0], &[3]];
    let admitted: Vec<Vec<(i64, i64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u32)
            .map(|th| {
                let t = Arc::clone(&t);
                s.spawn(move || {
                    let mut per_scope = vec![(0i64, 0i64); scopes.len()];
                    for k in 0..2000u32 {
                        let combo = combos[((k + th) as usize) % combos.len()];
                        let tokens = (k * 7 + th) % 9;
                        let limits: Vec<ScopeLimit<'_>> = combo
                            .iter()
                            .map(|&i| ScopeLimit {
                                name: scopes[i].0,
                                rpm: scopes[i].1,
                                tpm: scopes[i].2,
                            })
                            .collect();
                        let d = t.check(&limits, &request(tokens, 100.0));
                        if d.outcome == Outcome::Admitted {
                            for &i in combo {
                                per_scope[i].0 += 1;
                                per_scope[i].1 += i64::from(tokens);
                            }
                        } else {
                            assert!(
                                matches!(d.outcome, Outcome::Exact | Outcome::Denied),
                                "{d:?}"
                            );
                        }
                    }
                    per_scope
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect()
    });

    for (i, (name, rpm, tpm, lr, lt)) in scopes.iter().enumerate() {
        let requests: i64 = admitted.iter().map(|p| p[i].0).sum();
        let tokens: i64 = admitted.iter().map(|p| p[i].1).sum();
        // Every admission was charged to every scope of its check, and to no other.
        assert_eq!(
            t.take(name),
            Some((100, requests - i64::from(*lr), tokens - i64::from(*lt))),
            "{name}"
        );
        if *rpm > 0 {
            assert!(
                requests <= i64::from(*lr),
                "{name}: {requests} > lease {lr}"
            );
        }
        if *tpm > 0 {
            assert!(tokens <= i64::from(*lt), "{name}: {tokens} > lease {lt}");
        }
    }
    assert_eq!(
        admitted.iter().map(|p| p[0].0).sum::<i64>(),
        900,
        "a's lease is used up exactly"
    );
}

/// A stand-in for Redis: per scope, the fleet total (leases included) and the limits.
#[derive(Default)]
struct Fleet {
    totals: HashMap<String, (u32, u32)>,
    /// Pushed deltas, granted leases and charges made by exact checks, summed.
    pushed: (i64, i64),
    granted: (i64, i64),
    exact: (i64, i64),
}

impl Fleet {
    /// Drains the table, as a sync does, and answers each drained scope with its new totals
    /// and the lease granted (what it asked for, within its limits).
    fn sync(&mut self, t: &Table, idle_drains: u32) {
        for d in t.drain(100.0, W, idle_drains, 1) {
            let total = self.totals.entry(d.scope.to_string()).or_default();
            let grant = |total: u32, push: i64, want: u32, limit: u32| {
                let total = i64::from(total) + push;
                let lease = i64::from(want).min((i64::from(limit) - total).max(0));
                (total, lease)
            };
            let (requests, lease_requests) = grant(total.0, d.requests, d.want_requests, d.rpm);
            let (tokens, lease_tokens) = grant(total.1, d.tokens, d.want_tokens, d.tpm);
            let totals = Totals {
                window_start: 100,
                requests: u32::try_from(requests + lease_requests).expect("fits"),
                tokens: u32::try_from(tokens + lease_tokens).expect("fits"),
                lease_requests: u32::try_from(lease_requests).expect("fits"),
                lease_tokens: u32::try_from(lease_tokens).expect("fits"),
            };
            *total = (totals.requests, totals.tokens);
            self.pushed.0 += d.requests;
            self.pushed.1 += d.tokens;
            self.granted.0 += lease_requests;
            self.granted.1 += lease_tokens;
            assert!(t.apply(&d.scope, &totals, 100.0, W));
        }
    }

    /// Charges one request of `tokens` to each scope in Redis, as the exact path does when
    /// the limits are far away, and tells the table the new totals.
    fn exact(&mut self, t: &Table, scopes: &[&str], tokens: u32) {
        for &name in scopes {
            let total = self.totals.entry(name.to_string()).or_default();
            total.0 += 1;
            total.1 += tokens;
            self.exact.0 += 1;
            self.exact.1 += i64::from(tokens);
            let totals = Totals {
                window_start: 100,
                requests: total.0,
                tokens: total.1,
                ..Totals::default()
            };
            t.apply(name, &totals, 100.0, W);
        }
    }
}

#[test]
fn concurrent_sync_loses_and_doubles_no_charge() {
    let table = Arc::new(Table::with_key(64, 8, (13, 14)).expect("valid configuration"));
    let names: Vec<String> = (0..6).map(|i| format!("scope:{i}")).collect();
    let admitted_req = AtomicI64::new(0);
    let admitted_tok = AtomicI64::new(0);
    let stop = AtomicBool::new(false);
    let syncs = AtomicU64::new(0);
    let mut fleet = Fleet::default();
    for name in &names {
        // A first lease, so that checks admit locally before the first sync.
        fleet.totals.insert(name.clone(), (50, 200));
        fleet.granted.0 += 50;
        fleet.granted.1 += 200;
        assert!(lease(&table, name, 100, (50, 200), 100.0));
    }
    let fleet = parking_lot::Mutex::new(fleet);

    std::thread::scope(|s| {
        let (table, names, fleet, stop, syncs) = (&table, &names, &fleet, &stop, &syncs);
        s.spawn(move || {
            while !stop.load(Relaxed) {
                fleet.lock().sync(table, 2);
                syncs.fetch_add(1, Relaxed);
                for name in names {
                    if let Some((ws, r, tok)) = table.take(name) {
                        assert!(table.restore(name, ws, r, tok, 100.0, W));
                    }
                }
                std::thread::yield_now();
            }
        });
        let workers: Vec<_> = (0..8u32)
            .map(|th| {
                let (admitted_req, admitted_tok) = (&admitted_req, &admitted_tok);
                s.spawn(move || {
                    // Checks race the sync for many of its rounds.
                    let mut round = 0u32;
                    while round < 20_000 || syncs.load(Relaxed) < 200 {
                        round = round.wrapping_add(1);
                        let first = ((round + th) as usize) % names.len();
                        let second = (first + 1 + (round as usize % 3)) % names.len();
                        let tokens = round % 5;
                        let scopes = [
                            ScopeLimit {
                                name: &names[first],
                                rpm: u32::MAX / 2,
                                tpm: u32::MAX / 2,
                            },
                            ScopeLimit {
                                name: &names[second],
                                rpm: u32::MAX / 2,
                                tpm: 0,
                            },
                        ];
                        match table.check(&scopes, &request(tokens, 100.0)).outcome {
                            Outcome::Admitted => {}
                            Outcome::Exact | Outcome::Load => {
                                fleet
                                    .lock()
                                    .exact(table, &[&names[first], &names[second]], tokens);
                            }
                            Outcome::Denied => continue,
                        }
                        admitted_req.fetch_add(2, Relaxed);
                        admitted_tok.fetch_add(2 * i64::from(tokens), Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("no panic");
        }
        stop.store(true, Relaxed);
    });

    // Releasing every lease settles the table to zero: Redis then counts exactly what was
    // admitted. The first sync gives the leases back; the second finds nothing left to
    // push and frees the records.
    let mut fleet = fleet.into_inner();
    fleet.sync(&table, 0);
    fleet.sync(&table, 0);
    for name in &names {
        assert_eq!(table.take(name), None, "{name}");
    }
    let counted = fleet
        .totals
        .values()
        .fold((0i64, 0i64), |(r, tok), &(a, b)| {
            (r + i64::from(a), tok + i64::from(b))
        });
    assert!(fleet.granted.0 > 0, "leases were granted");
    assert!(admitted_req.load(Relaxed) > 0);
    assert_eq!(
        counted,
        (admitted_req.load(Relaxed), admitted_tok.load(Relaxed))
    );
    assert_eq!(
        (
            fleet.pushed.0 + fleet.granted.0 + fleet.exact.0,
            fleet.pushed.1 + fleet.granted.1 + fleet.exact.1
        ),
        counted
    );
}

#[test]
fn forgetting_leases_keeps_charges_to_push() {
    let t = table();
    assert!(lease(&t, "leased", 100, (5, 50), 100.0));
    assert_eq!(outcome(&t, "leased", 10, 100, 7, 100.0), Outcome::Admitted);
    assert!(apply(&t, "charged", 100, 0, 0, 100.0));
    assert!(t.record("charged", 3, 100.0, W));
    assert_eq!(t.forget_leases(), 1);
    // The request admitted from the lease since it was granted is not in what Redis lost:
    // it is pushed; the 4 requests and 43 tokens never spent are dropped.
    assert_eq!(t.take("leased"), Some((100, 1, 7)));
    assert_eq!(t.take("charged"), Some((100, 0, 3)));
    // Without its lease, the scope's next request goes to Redis.
    assert_eq!(outcome(&t, "leased", 10, 100, 7, 100.0), Outcome::Exact);

    // One scope at a time, as when Redis lost only that scope's window.
    assert!(lease(&t, "leased", 100, (5, 50), 100.0));
    assert!(t.record("charged", 2, 100.0, W));
    assert!(!t.forget_lease("charged"));
    assert!(!t.forget_lease("unknown"));
    assert!(t.forget_lease("leased"));
    assert_eq!(t.take("leased"), Some((100, 0, 0)));
    assert_eq!(t.take("charged"), Some((100, 0, 2)));
}

#[test]
fn forgetting_a_lease_keeps_a_correction_made_since_the_push() {
    // A scope charged offline holds no lease; its first push restores its window in Redis.
    let t = table();
    let offline = Request {
        offline: true,
        ..request(1025, 100.0)
    };
    assert_eq!(
        one(&t, "k", 0, 100_000, &offline).outcome,
        Outcome::Admitted
    );
    let pushed = drain(&t, 100.1);
    assert_eq!((pushed[0].requests, pushed[0].tokens), (1, 1025));
    // The call's usage comes in while the push is on its way: a refund, not a lease.
    assert!(t.record("k", -995, 100.2, W));
    assert!(!t.forget_lease("k"), "no lease was held");
    assert_eq!(t.take("k"), Some((100, 0, -995)));

    // With a lease: what Redis lost is the lease as of the push, and only that.
    let t = table();
    assert!(lease(&t, "k", 100, (0, 1000), 100.0));
    assert_eq!(outcome(&t, "k", 0, 100_000, 300, 100.0), Outcome::Admitted);
    let pushed = drain(&t, 100.1);
    // Used 300 of 1000: pushes nothing, and keeps the other 700 as its lease.
    assert_eq!(pushed[0].tokens, 0);
    assert_eq!(outcome(&t, "k", 0, 100_000, 200, 100.2), Outcome::Admitted);
    assert!(t.record("k", -150, 100.2, W));
    assert!(t.forget_lease("k"));
    // The request and 200 tokens charged and the 150 refunded since the push stay; the 700
    // leased go.
    assert_eq!(t.take("k"), Some((100, 1, 50)));

    // An exact check's push that keeps the token lease: what it keeps is the lease then.
    let t = table();
    assert!(lease(&t, "k", 100, (5, 50), 100.0));
    assert_eq!(outcome(&t, "k", 10, 100, 7, 100.0), Outcome::Admitted);
    assert_eq!(t.take_keeping("k", (false, true)), Some((100, -4, 0)));
    assert!(t.record("k", -5, 100.1, W));
    assert!(t.forget_lease("k"));
    // The 43 tokens kept are dropped; the correction made since stays.
    assert_eq!(t.take("k"), Some((100, 0, -5)));
}

#[test]
fn a_token_correction_sizes_the_next_token_lease() {
    let t = table();
    assert!(lease(&t, "u", 100, (5, 50), 100.0));
    assert_eq!(outcome(&t, "u", 10, 1000, 10, 100.0), Outcome::Admitted);
    // The call used 30 more tokens than estimated.
    assert!(t.record("u", 30, 100.0, W));
    let d = t.drain(100.5, W, 10, 1);
    // Used 40 tokens: keep 2 * 40 + 10, holding 50 - 10 - 30 = 10; ask for the other 80.
    // One request of the five leased is used: keep three, give one back.
    assert_eq!(d, vec![delta("u", 100, (-1, 0), (0, 80), (10, 1000))]);
}
