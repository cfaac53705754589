//! Behaviour tests of the table: one per rule, a property test against a small reference
//! model, exact-count concurrency tests and the eviction cap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

const W: u32 = 60;

fn table() -> Table {
    Table::with_key(1000, 4, (1, 2)).expect("valid configuration")
}

fn request(tokens: u32, now: f64) -> Request {
    Request {
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
    assert!(t.apply("user:u", 100, 1, 0, 100.0, W));
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 159.9), Outcome::Admitted);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 160.0), Outcome::Load);
}

#[test]
fn denies_when_known_total_reaches_limit() {
    let t = table();
    assert!(t.apply("user:u", 100, 10, 0, 100.0, W));
    let d = one(&t, "user:u", 10, 0, &request(0, 130.5));
    assert_eq!(d, Decision::not_admitted(Outcome::Denied, 0, 29.5));
}

#[test]
fn denies_when_known_plus_pending_reaches_limit() {
    let t = table();
    assert!(t.apply("user:u", 100, 7, 0, 100.0, W));
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
    assert!(t.apply("user:u", 100, 0, 90, 100.0, W));
    assert_eq!(outcome(&t, "user:u", 0, 100, 11, 100.0), Outcome::Denied);
    let d = one(&t, "user:u", 0, 100, &request(10, 100.0));
    assert_eq!(d.outcome, Outcome::Admitted);
    assert_eq!((d.remaining_requests, d.remaining_tokens), (-1, 0));
}

#[test]
fn zero_token_estimate_requires_strictly_below_limit() {
    let t = table();
    assert!(t.apply("user:u", 100, 0, 99, 100.0, W));
    assert_eq!(outcome(&t, "user:u", 0, 100, 0, 100.0), Outcome::Admitted);
    assert!(t.apply("user:u", 100, 0, 100, 100.0, W));
    assert_eq!(outcome(&t, "user:u", 0, 100, 0, 100.0), Outcome::Denied);
}

#[test]
fn stale_scope_gets_exactly_one_optimistic_charge() {
    let t = table();
    assert!(t.apply("user:u", 100, 0, 0, 100.0, W));
    assert_eq!(t.drain(), vec![]);
    assert_eq!(
        t.stats().active,
        0,
        "an untouched applied record lives one drain"
    );

    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Load);

    assert!(t.apply("user:u", 100, 1, 0, 101.0, W));
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
}

#[test]
fn stale_scope_with_drained_charge_gets_another_optimistic_charge() {
    let t = table();
    assert!(t.apply("user:u", 100, 0, 0, 100.0, W));
    t.drain();
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
    assert_eq!(t.drain().len(), 1);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Admitted);
    assert_eq!(outcome(&t, "user:u", 10, 0, 0, 101.0), Outcome::Load);
}

#[test]
fn exact_when_remaining_is_within_twice_the_fleet_rate() {
    let t = table();
    assert!(t.apply("user:u", 100, 10, 0, 100.0, W));
    assert!(t.apply("user:u", 100, 40, 0, 110.0, W));
    assert_eq!(outcome(&t, "user:u", 100, 0, 0, 110.0), Outcome::Exact);
    assert_eq!(outcome(&t, "user:u", 101, 0, 0, 110.0), Outcome::Admitted);
}

#[test]
fn exact_when_this_proxy_spent_its_share() {
    let t = table();
    assert!(t.apply("user:u", 100, 0, 0, 100.0, W));
    let req = Request {
        proxies: 3,
        ..request(0, 100.0)
    };
    for _ in 0..3 {
        assert_eq!(one(&t, "user:u", 10, 0, &req).outcome, Outcome::Admitted);
    }
    assert_eq!(one(&t, "user:u", 10, 0, &req).outcome, Outcome::Exact);

    let req = Request {
        proxies: 3,
        ..request(40, 100.0)
    };
    assert_eq!(one(&t, "team:t", 0, 100, &req).outcome, Outcome::Load);
    assert!(t.apply("team:t", 100, 0, 0, 100.0, W));
    assert_eq!(one(&t, "team:t", 0, 100, &req).outcome, Outcome::Exact);
    let req = Request { tokens: 33, ..req };
    assert_eq!(one(&t, "team:t", 0, 100, &req).outcome, Outcome::Admitted);
}

#[test]
fn denied_beats_load_beats_exact_and_the_first_scope_decides() {
    let t = table();
    assert!(t.apply("a", 100, 0, 0, 100.0, W));
    assert!(t.apply("b", 100, 10, 0, 100.0, W));
    assert!(t.apply("c", 100, 10, 0, 100.0, W));
    let near = ScopeLimit {
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
    let exact = Request { proxies: 2, ..req };
    assert_eq!(
        t.check(&[near, unknown, over("b"), over("c")], &exact),
        Decision::not_admitted(Outcome::Denied, 2, 60.0)
    );
    assert_eq!(
        t.check(&[near, unknown], &exact),
        Decision::not_admitted(Outcome::Load, 1, 0.0)
    );
    assert_eq!(
        t.check(&[near], &exact),
        Decision::not_admitted(Outcome::Exact, 0, 0.0)
    );
}

#[test]
fn a_denial_charges_no_scope() {
    let t = table();
    assert!(t.apply("a", 100, 0, 0, 100.0, W));
    assert!(t.apply("b", 100, 5, 0, 100.0, W));
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
    assert_eq!(t.take("a"), Some((100, 0, 0)));
    assert_eq!(t.take("b"), Some((100, 0, 0)));
}

#[test]
fn admitted_check_charges_every_scope_and_reports_smallest_remainders() {
    let t = table();
    assert!(t.apply("a", 100, 2, 50, 100.0, W));
    assert!(t.apply("b", 100, 1, 10, 100.0, W));
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
    let mut drained = t.drain();
    drained.sort_by(|x, y| x.scope.cmp(&y.scope));
    assert_eq!(
        drained,
        vec![
            Delta {
                scope: "a".into(),
                window_start: 100,
                requests: 1,
                tokens: 7
            },
            Delta {
                scope: "b".into(),
                window_start: 100,
                requests: 1,
                tokens: 7
            },
        ]
    );
}

#[test]
fn offline_starts_a_local_window_and_never_loads() {
    let t = table();
    let req = Request {
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
fn offline_ignores_staleness_and_nearness() {
    let t = table();
    assert!(t.apply("user:u", 100, 10, 0, 100.0, W));
    assert!(t.apply("user:u", 100, 50, 0, 100.0, W));
    t.drain();
    let req = Request {
        offline: true,
        ..request(0, 100.0)
    };
    for _ in 0..3 {
        assert_eq!(one(&t, "user:u", 100, 0, &req).outcome, Outcome::Admitted);
    }
}

#[test]
fn offline_denies_a_scope_it_cannot_track() {
    let t = Table::with_key(1, 1, (1, 2)).expect("valid configuration");
    assert!(t.apply("a", 100, 0, 0, 100.0, W));
    let req = Request {
        offline: true,
        ..request(0, 100.0)
    };
    let d = one(&t, "b", 10, 0, &req);
    assert_eq!(d, Decision::not_admitted(Outcome::Denied, 0, 1.0));
    assert_eq!(t.stats().rejected, 1);
}

#[test]
fn apply_of_a_newer_window_drops_pending_and_rate() {
    let t = table();
    assert!(t.apply("u", 100, 0, 0, 100.0, W));
    assert!(t.apply("u", 100, 30, 0, 100.0, W));
    assert_eq!(outcome(&t, "u", 100, 0, 0, 100.0), Outcome::Admitted);
    assert!(t.apply("u", 160, 5, 0, 160.0, W));
    assert_eq!(t.take("u"), Some((160, 0, 0)));
    assert_eq!(outcome(&t, "u", 20, 0, 0, 160.0), Outcome::Admitted);
}

#[test]
fn apply_of_an_older_window_is_ignored() {
    let t = table();
    assert!(t.apply("u", 160, 5, 0, 160.0, W));
    assert!(t.apply("u", 100, 50, 0, 160.0, W));
    let d = one(&t, "u", 10, 0, &request(0, 160.0));
    assert_eq!(d.remaining_requests, 4);
}

#[test]
fn apply_rejects_a_scope_when_every_tracked_scope_is_active() {
    let t = Table::with_key(4, 1, (1, 2)).expect("valid configuration");
    for name in ["a", "b", "c", "d"] {
        assert!(t.apply(name, 100, 0, 0, 100.0, W));
    }
    assert!(!t.apply("e", 100, 0, 0, 100.0, W));
    assert_eq!(t.stats().rejected, 1);
    assert_eq!(t.len(), 4);

    t.drain();
    assert!(t.apply("e", 100, 0, 0, 100.0, W));
    assert_eq!(t.len(), 4);
    assert_eq!(t.stats().evictions, 1);
}

#[test]
fn a_full_shard_evicts_an_ended_idle_scope_first() {
    let t = Table::with_key(3, 1, (1, 2)).expect("valid configuration");
    assert!(t.apply("old", 10, 0, 0, 100.0, W));
    assert!(t.apply("idle", 100, 0, 0, 100.0, W));
    assert!(t.apply("busy", 100, 0, 0, 100.0, W));
    t.drain();
    assert_eq!(outcome(&t, "busy", 10, 0, 0, 100.0), Outcome::Admitted);
    assert!(t.apply("new", 100, 0, 0, 100.0, W));
    assert_eq!(t.take("old"), None);
    assert_eq!(outcome(&t, "old", 10, 0, 0, 100.0), Outcome::Load);
    assert_eq!(outcome(&t, "idle", 10, 0, 0, 100.0), Outcome::Admitted);
    assert_eq!(t.take("busy"), Some((100, 1, 0)));
}

#[test]
fn drain_keeps_touched_records_and_drops_idle_ones() {
    let t = table();
    assert!(t.apply("u", 100, 0, 0, 100.0, W));
    assert_eq!(outcome(&t, "u", 10, 0, 3, 100.0), Outcome::Admitted);
    assert_eq!(t.stats().pending, 1);
    assert_eq!(t.drain().len(), 1);
    assert_eq!(t.stats().active, 1);
    assert_eq!(t.stats().pending, 0);
    assert_eq!(t.drain(), vec![]);
    assert_eq!(t.stats().active, 0);
    assert_eq!(t.take("u"), None);
}

#[test]
fn take_and_restore_give_back_a_delta_of_the_same_open_window() {
    let t = table();
    assert!(t.apply("u", 100, 0, 0, 100.0, W));
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
    assert!(t.apply("u", 100, 0, 0, 100.0, W));
    t.drain();
    assert!(t.restore("u", 100, 2, 9, 100.0, W));
    assert_eq!(t.stats().active, 1);
    assert_eq!(
        outcome(&t, "u", 10, 0, 0, 100.0),
        Outcome::Load,
        "restored, still stale"
    );
    assert_eq!(t.drain()[0].requests, 2);
}

#[test]
fn record_adds_a_signed_token_correction_to_an_open_window() {
    let t = table();
    assert!(!t.record("u", 5, 100.0, W));
    assert!(t.apply("u", 100, 0, 0, 100.0, W));
    assert!(t.record("u", -7, 100.0, W));
    assert!(t.record("u", 2, 100.0, W));
    assert!(!t.record("u", 2, 160.0, W));
    assert_eq!(t.take("u"), Some((100, 0, -5)));
}

#[test]
fn extreme_values_saturate_instead_of_panicking() {
    let t = table();
    assert!(t.apply("u", u32::MAX, u32::MAX, u32::MAX, f64::from(u32::MAX), 1));
    assert!(t.record("u", i64::MAX, f64::from(u32::MAX), 1));
    assert!(t.record("u", i64::MAX, f64::from(u32::MAX), 1));
    assert!(t.restore("u", u32::MAX, i64::MAX, i64::MIN, f64::from(u32::MAX), 1));
    let req = Request {
        tokens: u32::MAX,
        now: f64::from(u32::MAX),
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
                offline: true,
                ..req
            },
        );
    }
    assert!(t.record("u", i64::MIN, f64::from(u32::MAX), 1));
    t.drain();
    t.stats();
    t.evict(f64::from(u32::MAX), u32::MAX, usize::MAX);
}

#[test]
fn evict_removes_only_idle_scopes_whose_window_ended() {
    let t = table();
    assert!(t.apply("ended", 100, 0, 0, 100.0, W));
    assert!(t.apply("open", 150, 0, 0, 150.0, W));
    assert!(t.apply("active", 100, 0, 0, 100.0, W));
    t.drain();
    assert!(t.apply("active", 100, 0, 0, 100.0, W));
    assert_eq!(t.evict(170.0, W, 100), 1);
    assert_eq!(t.len(), 2);
    assert_eq!(t.stats().evictions, 1);
    assert_eq!(t.evict(170.0, W, 100), 0);
}

#[test]
fn evict_does_bounded_work_and_resumes() {
    let t = Table::with_key(10_000, 8, (1, 2)).expect("valid configuration");
    for i in 0..1000 {
        assert!(t.apply(&format!("s{i}"), 100, 0, 0, 100.0, W));
    }
    t.drain();
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
        assert!(t.apply(name, 100, 0, 0, 100.0, W));
    }
    let mut rejected = 0;
    for batch in 0..100 {
        for i in 0..100 {
            if !t.apply(&format!("flood:{batch}:{i}"), 100, 0, 0, 100.0, W) {
                rejected += 1;
            }
            assert!(t.len() <= max as usize);
        }
        for name in &hot {
            assert_eq!(outcome(&t, name, 0, 0, 1, 100.0), Outcome::Admitted);
        }
        t.drain();
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
        assert!(t.apply(&format!("api_key:{i:032x}"), 100, 0, 0, 100.0, W));
        if i % 10_000 == 9_999 {
            t.drain();
        }
    }
    t.drain();
    let stats = t.stats();
    assert_eq!(stats.scopes, u64::from(n));
    assert_eq!(stats.active, 0);
    let per_scope = stats.memory_bytes as f64 / f64::from(n);
    assert!(per_scope <= 32.0, "{per_scope} bytes per scope");
}

#[test]
fn index_survives_many_inserts_and_removals() {
    let t = Table::with_key(512, 1, (7, 8)).expect("valid configuration");
    for round in 0..20u32 {
        let now = f64::from(round * 100);
        for i in 0..500 {
            assert!(t.apply(&format!("{round}:{i}"), round * 100, i, 0, now, W));
        }
        t.drain();
        for i in 0..500 {
            let d = one(&t, &format!("{round}:{i}"), 1000, 0, &request(0, now));
            assert_eq!(d.outcome, Outcome::Admitted);
            assert_eq!(d.remaining_requests, i64::from(1000 - i - 1));
        }
        t.drain();
        t.drain();
        assert_eq!(t.evict(now + 100.0, W, 200), 200);
    }
}

// ---------------------------------------------------------------------------------------------
// Reference model.

#[derive(Clone, Debug, Default)]
struct RefRecord {
    pend_req: i64,
    pend_tok: i64,
    rate_req: u32,
    rate_tok: u32,
    own_req: u32,
    own_tok: u32,
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

impl Model {
    fn verdict(st: &RefState, rpm: u32, tpm: u32, req: &Request) -> (u8, f64) {
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
            return (0, retry);
        }
        let spent = (lr > 0 && pr + 1 > (lr - gr).div_euclid(p))
            || (lt > 0 && pt + t > (lt - gt).div_euclid(p));
        if req.offline {
            return if spent { (0, retry) } else { (3, 0.0) };
        }
        let stale = st.rec.as_ref().is_none_or(|r| !r.fresh);
        if stale && st.rec.is_some() && pr != 0 {
            return (1, 0.0);
        }
        let (rr, rt) = st.rec.as_ref().map_or((0, 0), |r| {
            (
                i128::from(r.rate_req).max(p * i128::from(r.own_req)),
                i128::from(r.rate_tok).max(p * i128::from(r.own_tok)),
            )
        });
        let near = (lr > 0 && lr - gr <= 2 * rr) || (lt > 0 && lt - gt <= 2 * rt);
        if near || spent {
            (2, 0.0)
        } else {
            (3, 0.0)
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
                    st.ws = start;
                    st.g_req = 0;
                    st.g_tok = 0;
                    if let Some(r) = st.rec.as_mut() {
                        *r = RefRecord {
                            fresh: r.fresh,
                            touched: r.touched,
                            ..RefRecord::default()
                        };
                    }
                }
            }
        }

        let mut worst: Option<(usize, u8, f64)> = None;
        for (i, (name, rpm, tpm)) in scopes.iter().enumerate() {
            let (rank, retry) = match self.scopes.get(name) {
                Some(st) if st.open(req.now, req.window) => Self::verdict(st, *rpm, *tpm, req),
                _ => (1, 0.0),
            };
            if worst.is_none_or(|(_, r, _)| rank < r) {
                worst = Some((i, rank, retry));
            }
        }
        match worst {
            Some((i, 0, retry)) => return Decision::not_admitted(Outcome::Denied, i, retry),
            Some((i, 1, _)) => return Decision::not_admitted(Outcome::Load, i, 0.0),
            Some((i, 2, _)) => return Decision::not_admitted(Outcome::Exact, i, 0.0),
            _ => {}
        }

        let (mut left_r, mut left_t) = (None::<i64>, None::<i64>);
        for (name, rpm, tpm) in scopes {
            let st = self.scopes.get_mut(name).expect("checked above");
            let rec = st.rec.get_or_insert_with(RefRecord::default);
            rec.pend_req += 1;
            rec.pend_tok += i64::from(req.tokens);
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

    fn apply(
        &mut self,
        name: &str,
        ws: u32,
        req_total: u32,
        tok_total: u32,
        now: f64,
        window: u32,
    ) -> bool {
        let st = self.scopes.entry(name.to_owned()).or_insert(RefState {
            ws,
            g_req: req_total,
            g_tok: tok_total,
            rec: None,
        });
        let mut reset = false;
        let rates = if ws == st.ws {
            (
                req_total.saturating_sub(st.g_req),
                tok_total.saturating_sub(st.g_tok),
            )
        } else if now >= f64::from(ws) + f64::from(window) {
            return true;
        } else {
            reset = !st.open(now, window);
            (0, 0)
        };
        st.ws = ws;
        st.g_req = req_total;
        st.g_tok = tok_total;
        let rec = st.rec.get_or_insert_with(RefRecord::default);
        if reset {
            rec.pend_req = 0;
            rec.pend_tok = 0;
            rec.own_req = 0;
            rec.own_tok = 0;
        }
        (rec.rate_req, rec.rate_tok) = rates;
        rec.fresh = true;
        true
    }

    fn drain(&mut self) -> Vec<(String, u32, i64, i64)> {
        let mut out = Vec::new();
        for (name, st) in &mut self.scopes {
            let Some(rec) = st.rec.as_mut() else {
                continue;
            };
            let (r, t) = (rec.pend_req, rec.pend_tok);
            let touched = rec.touched;
            rec.own_req = r.clamp(0, i64::from(u32::MAX)) as u32;
            rec.own_tok = t.clamp(0, i64::from(u32::MAX)) as u32;
            rec.pend_req = 0;
            rec.pend_tok = 0;
            rec.touched = false;
            if r != 0 || t != 0 {
                out.push((name.clone(), st.ws, r, t));
            } else if !touched {
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
        requests: u32,
        tokens: u32,
    },
    Drain,
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
        3 => (scope.clone(), 0u32..4, 0u32..10, 0u32..25).prop_map(
            |(scope, age, requests, tokens)| Op::Apply {
                scope,
                age,
                requests,
                tokens
            }
        ),
        1 => Just(Op::Drain),
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

fn sorted(deltas: Vec<Delta>) -> Vec<(String, u32, i64, i64)> {
    let mut out: Vec<_> = deltas
        .into_iter()
        .map(|d| (d.scope.to_string(), d.window_start, d.requests, d.tokens))
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
                    let req = Request { tokens, now, window: W, proxies, offline };
                    prop_assert_eq!(t.check(&limits, &req), m.check(&owned, &req));
                }
                Op::Apply { scope, age, requests, tokens } => {
                    let ws = window_start(now, age);
                    prop_assert_eq!(
                        t.apply(NAMES[scope], ws, requests, tokens, now, W),
                        m.apply(NAMES[scope], ws, requests, tokens, now, W)
                    );
                }
                Op::Drain => prop_assert_eq!(sorted(t.drain()), m.drain()),
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
fn concurrent_checks_never_pass_the_share_and_charge_all_or_nothing() {
    let t = Arc::new(Table::with_key(1000, 4, (11, 12)).expect("valid configuration"));
    let limits = [
        ("a", 900u32, 0u32),
        ("b", 700, 0),
        ("c", 0, 6000),
        ("d", 500, 5000),
    ];
    for (name, _, _) in limits {
        assert!(t.apply(name, 100, 0, 0, 100.0, W));
    }
    let combos: [&[usize]; 5] = [&[0, 1], &[0], &[1, 2], &[2, 3, 0], &[3]];
    let admitted: Vec<Vec<(i64, i64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u32)
            .map(|th| {
                let t = Arc::clone(&t);
                s.spawn(move || {
                    let mut per_scope = vec![(0i64, 0i64); limits.len()];
                    for k in 0..2000u32 {
                        let combo = combos[((k + th) as usize) % combos.len()];
                        let tokens = (k * 7 + th) % 9;
                        let scopes: Vec<ScopeLimit<'_>> = combo
                            .iter()
                            .map(|&i| ScopeLimit {
                                name: limits[i].0,
                                rpm: limits[i].1,
                                tpm: limits[i].2,
                            })
                            .collect();
                        let d = t.check(&scopes, &request(tokens, 100.0));
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

    for (i, (name, rpm, tpm)) in limits.iter().enumerate() {
        let requests: i64 = admitted.iter().map(|p| p[i].0).sum();
        let tokens: i64 = admitted.iter().map(|p| p[i].1).sum();
        assert_eq!(t.take(name), Some((100, requests, tokens)), "{name}");
        if *rpm > 0 {
            assert!(requests <= i64::from(*rpm), "{name}: {requests} > {rpm}");
        }
        if *tpm > 0 {
            assert!(tokens <= i64::from(*tpm), "{name}: {tokens} > {tpm}");
        }
    }
    assert_eq!(
        admitted.iter().map(|p| p[0].0).sum::<i64>(),
        900,
        "a is used up exactly"
    );
}

#[test]
fn concurrent_sync_loses_and_doubles_no_charge() {
    let t = Arc::new(Table::with_key(64, 8, (13, 14)).expect("valid configuration"));
    let names: Vec<String> = (0..6).map(|i| format!("scope:{i}")).collect();
    let admitted_req = AtomicI64::new(0);
    let admitted_tok = AtomicI64::new(0);
    let synced_req = AtomicI64::new(0);
    let synced_tok = AtomicI64::new(0);
    let stop = AtomicBool::new(false);
    let fleet: parking_lot::Mutex<HashMap<String, (u32, u32)>> = parking_lot::Mutex::default();
    for name in &names {
        assert!(t.apply(name, 100, 0, 0, 100.0, W));
    }

    std::thread::scope(|s| {
        let (t, names, fleet) = (&t, &names, &fleet);
        let (synced_req, synced_tok, stop) = (&synced_req, &synced_tok, &stop);
        let sync = move || {
            let mut fleet = fleet.lock();
            for d in t.drain() {
                synced_req.fetch_add(d.requests, Relaxed);
                synced_tok.fetch_add(d.tokens, Relaxed);
                let total = fleet.entry(d.scope.to_string()).or_default();
                total.0 = total.0.saturating_add(d.requests as u32);
                total.1 = total.1.saturating_add(d.tokens as u32);
            }
            for name in names {
                let (r, tok) = fleet.get(name).copied().unwrap_or_default();
                t.apply(name, 100, r, tok, 100.0, W);
            }
        };
        s.spawn(move || {
            while !stop.load(Relaxed) {
                sync();
                for name in names {
                    if let Some((ws, r, tok)) = t.take(name) {
                        assert!(t.restore(name, ws, r, tok, 100.0, W));
                    }
                }
                std::thread::yield_now();
            }
        });
        let workers: Vec<_> = (0..8u32)
            .map(|th| {
                let (admitted_req, admitted_tok) = (&admitted_req, &admitted_tok);
                s.spawn(move || {
                    for k in 0..20_000u32 {
                        let a = ((k + th) as usize) % names.len();
                        let b = (a + 1 + (k as usize % 3)) % names.len();
                        let tokens = k % 5;
                        let scopes = [
                            ScopeLimit {
                                name: &names[a],
                                rpm: u32::MAX / 2,
                                tpm: u32::MAX / 2,
                            },
                            ScopeLimit {
                                name: &names[b],
                                rpm: u32::MAX / 2,
                                tpm: 0,
                            },
                        ];
                        let d = t.check(&scopes, &request(tokens, 100.0));
                        if d.outcome == Outcome::Admitted {
                            admitted_req.fetch_add(2, Relaxed);
                            admitted_tok.fetch_add(2 * i64::from(tokens), Relaxed);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("no panic");
        }
        stop.store(true, Relaxed);
    });

    for d in t.drain() {
        synced_req.fetch_add(d.requests, Relaxed);
        synced_tok.fetch_add(d.tokens, Relaxed);
    }
    assert!(admitted_req.load(Relaxed) > 0);
    assert_eq!(synced_req.load(Relaxed), admitted_req.load(Relaxed));
    assert_eq!(synced_tok.load(Relaxed), admitted_tok.load(Relaxed));
}
