//! The hot tier's counter table, in plain Rust (no Python types).
//!
//! Layout, per shard:
//! - `entries`: a dense `Vec<Entry>` of 24 bytes per tracked scope (fingerprint, window start,
//!   fleet totals at the last apply, index of the active record);
//! - `slots`: an open-addressing index of `u32` (linear probing, backward-shift deletion), each
//!   slot holding `tag << idx_bits | (entry index + 1)`, 0 for empty;
//! - `records`: the state of scopes charged recently (name, pending deltas, rates), with a free
//!   list so that record indices stay stable while readers hold the read lock.
//!
//! Locking: entries, the index and the record list change only under the shard's write lock.
//! Under the read lock, only the atomics of a record change (`pend_*`, `lease_*`, `used_*`,
//! `touched`), each by its own read-modify-write. Every atomic access is therefore `Relaxed`:
//! the shard lock orders everything that must be seen together, and each counter needs only
//! the atomicity of its own read-modify-write (checks re-validate their conditions in a
//! compare-and-swap loop instead of relying on an order between two counters).
//!
//! A check that charges several scopes locks the distinct shards involved in ascending order,
//! so no two threads can wait on each other (writers only ever hold one shard at a time, except
//! a check's write path, which also locks in ascending order).

#![forbid(unsafe_code)]

use std::hash::Hasher;
use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed,
};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use siphasher::sip128::{Hasher128, SipHasher13};
use smallvec::SmallVec;

/// `Entry::active` of a scope without an active record.
const NONE: u32 = u32::MAX;

/// The most scopes `Table::new` accepts.
pub const MAX_SCOPES: u64 = 1 << 31;

/// The most shards `Table::new` accepts.
pub const MAX_SHARDS: usize = 1024;

/// Index load past which the index grows, as a fraction `LOAD_NUM / LOAD_DEN`.
const LOAD_NUM: usize = 4;
const LOAD_DEN: usize = 5;

/// The most entries a shard reserves up front (24 MiB of address space per 1M).
const MAX_RESERVED_ENTRIES: usize = 1 << 22;

/// Bytes of a memory page, the unit in which reserved entries become memory.
const PAGE_BYTES: usize = 4096;

/// Smallest index capacity, in slots.
const MIN_SLOTS: usize = 8;

/// How many entries an insert into a full shard looks at, past the first idle one, for an idle
/// entry whose window has also ended.
const VICTIM_SCAN: usize = 64;

/// How a check ended for the request as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted from local state and charged to every scope.
    Admitted = 0,
    /// A scope is over its limit by what this process knows; nothing charged.
    Denied = 1,
    /// A scope is unknown, its window has ended, or its state is stale: read it from Redis.
    Load = 2,
    /// A scope is near its limit or this process spent its share: ask Redis atomically.
    Exact = 3,
}

/// The result of `Table::check`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The scope that decided a non-admitted outcome, `None` when admitted.
    pub index: Option<usize>,
    /// Smallest `rpm - seen` over the scopes with a request limit after the charge; -1 when
    /// none has one or when the request was not admitted.
    pub remaining_requests: i64,
    /// As `remaining_requests`, for tokens.
    pub remaining_tokens: i64,
    /// Seconds until the denying scope's window ends; 0 unless denied.
    pub retry_after: f64,
}

impl Decision {
    fn not_admitted(outcome: Outcome, index: usize, retry_after: f64) -> Self {
        Self {
            outcome,
            index: Some(index),
            remaining_requests: -1,
            remaining_tokens: -1,
            retry_after,
        }
    }
}

/// One scope of a check, with its limits (0 = no limit).
#[derive(Clone, Copy, Debug)]
pub struct ScopeLimit<'a> {
    pub name: &'a str,
    pub rpm: u32,
    pub tpm: u32,
}

/// The arguments of a check shared by all its scopes.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// Requests charged to every scope: 1, or 0 to charge tokens only (a token reservation
    /// for a request already counted).
    pub requests: u32,
    /// Token estimate charged to every scope.
    pub tokens: u32,
    /// Seconds on Redis's clock; finite, 0 or more.
    pub now: f64,
    /// Window length in seconds, 1 or more.
    pub window: u32,
    /// Proxies sharing the limits, 1 or more.
    pub proxies: u32,
    /// Redis is unreachable: serve from local state with this proxy's share.
    pub offline: bool,
}

/// A scope's totals as a Redis script returned them, with the lease it reserved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub window_start: u32,
    /// Fleet totals, every proxy's outstanding lease included.
    pub requests: u32,
    pub tokens: u32,
    /// What Redis reserved for this proxy to spend locally.
    pub lease_requests: u32,
    pub lease_tokens: u32,
}

/// One scope's part of a sync, taken by `Table::drain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    pub scope: Arc<str>,
    pub window_start: u32,
    /// To add to Redis: charges made without a lease, minus lease given back (signed).
    pub requests: i64,
    pub tokens: i64,
    /// The lease to ask for on top of what this proxy still holds.
    pub want_requests: u32,
    pub want_tokens: u32,
    /// The limits of the scope's last charge, which cap the lease.
    pub rpm: u32,
    pub tpm: u32,
}

/// Counters reported by `Table::stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub scopes: u64,
    pub active: u64,
    pub memory_bytes: u64,
    pub evictions: u64,
    pub rejected: u64,
    pub pending: u64,
}

/// A configuration the table cannot be built with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    MaxScopes(u64),
    Shards(usize),
    /// The operating system gave no random key.
    Random(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MaxScopes(v) => {
                write!(f, "max_scopes must be between 1 and {MAX_SCOPES}, got {v}")
            }
            Self::Shards(v) => write!(
                f,
                "shards must be a power of two between 1 and {MAX_SHARDS}, got {v}"
            ),
            Self::Random(e) => write!(f, "could not get a random hash key: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One tracked scope. 24 bytes, align 4: this is the memory an idle scope costs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Entry {
    fp_lo: u32,
    fp_hi: u32,
    window_start: u32,
    /// Fleet request total at the last apply.
    g_req: u32,
    /// Fleet token total at the last apply.
    g_tok: u32,
    /// Index of the active record in `Shard::records`, or `NONE`.
    active: u32,
}

const _: () = assert!(size_of::<Entry>() == 24);

impl Entry {
    fn fingerprint(&self) -> u64 {
        u64::from(self.fp_hi) << 32 | u64::from(self.fp_lo)
    }

    fn window_ended(&self, now: f64, window: u32) -> bool {
        now >= f64::from(self.window_start) + f64::from(window)
    }
}

/// The state of a scope charged recently.
#[derive(Debug, Default)]
struct Record {
    /// `None` while the record is on the free list.
    name: Option<Arc<str>>,
    pend_req: AtomicI64,
    pend_tok: AtomicI64,
    /// The lease Redis counts for this process, as of the last push or grant. Charges and
    /// corrections since then change `pend_*` alone. This is what Redis loses with the
    /// window, and all that `forget_lease` may drop.
    lease_req: AtomicI64,
    lease_tok: AtomicI64,
    /// What this process charged since the last drain; sizes the next lease.
    used_req: AtomicI64,
    used_tok: AtomicI64,
    /// The limits and token estimate of the last charge, for the lease the sync asks for.
    lim_req: AtomicU32,
    lim_tok: AtomicU32,
    last_tokens: AtomicU32,
    /// Drains in a row that found the scope untouched.
    idle: u32,
    /// Drains since the scope was last settled (synced); `used_*` accumulate over them.
    unsettled: u32,
    /// Index of the owning entry.
    entry: u32,
    /// Set by apply; false on a record created by a charge on a stale scope.
    fresh: bool,
    /// Charged since the last drain.
    touched: AtomicBool,
}

impl Record {
    /// Nothing to push: what it holds, if anything, is a lease Redis already counts, so
    /// forgetting it only makes this process deny early in that window.
    fn settled(&self) -> bool {
        self.pend_req.load(Relaxed) <= 0 && self.pend_tok.load(Relaxed) <= 0
    }

    /// Drops the lease this record holds, and only that: whatever was charged or corrected
    /// since the last push or grant stays pending, for the next push. (A negative pending
    /// delta is not all lease: a correction recorded while a push was on its way is one.)
    /// True when it held one.
    fn forget_lease(&self) -> bool {
        let req = self.lease_req.swap(0, Relaxed);
        let tok = self.lease_tok.swap(0, Relaxed);
        add_saturating(&self.pend_req, req);
        add_saturating(&self.pend_tok, tok);
        req > 0 || tok > 0
    }

    /// Records that the pending delta, just settled by a push, is minus the lease now held.
    fn pushed(&mut self) {
        *self.lease_req.get_mut() = self.pend_req.get_mut().saturating_neg().max(0);
        *self.lease_tok.get_mut() = self.pend_tok.get_mut().saturating_neg().max(0);
    }

    fn add(&self, requests: i64, tokens: i64) {
        add_saturating(&self.pend_req, requests);
        add_saturating(&self.pend_tok, tokens);
        self.touched.store(true, Relaxed);
    }
}

fn add_saturating(cell: &AtomicI64, delta: i64) {
    if delta == 0 {
        return;
    }

    // The closure always returns Some, so this cannot fail.
    let _ = cell.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(delta)));
}

/// A scope name reduced to what the table uses.
#[derive(Clone, Copy, Debug)]
struct Hashed {
    fp: u64,
    shard: usize,
    /// High bits stored in the index slot; compared before the entry is read.
    tag: u32,
}

#[derive(Debug, Default)]
struct Shard {
    slots: Vec<u32>,
    entries: Vec<Entry>,
    records: Vec<Record>,
    free_records: Vec<u32>,
    live_records: usize,
    name_bytes: usize,
    /// Clock hand for choosing an eviction victim in a full shard.
    hand: usize,
}

/// Per-table constants the shards need.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    /// Most entries per shard.
    per_shard: usize,
    /// Bits of a slot that hold `entry index + 1`.
    idx_bits: u32,
}

impl Geometry {
    fn slot(self, tag: u32, idx: usize) -> u32 {
        ((u64::from(tag) << self.idx_bits) | (idx as u64 + 1)) as u32
    }

    fn slot_idx(self, slot: u32) -> usize {
        let mask = (1u64 << self.idx_bits) - 1;
        ((u64::from(slot) & mask) as usize).wrapping_sub(1)
    }

    fn slot_tag(self, slot: u32) -> u32 {
        (u64::from(slot) >> self.idx_bits) as u32
    }

    /// The top bits of the fingerprint's low half that a slot keeps beside the entry index
    /// (the home slot comes from the high half).
    fn tag(self, fp: u64) -> u32 {
        let tag_bits = 32 - self.idx_bits;
        if tag_bits == 0 {
            0
        } else {
            (fp as u32) >> self.idx_bits
        }
    }

    fn with_idx(self, slot: u32, idx: usize) -> u32 {
        self.slot(self.slot_tag(slot), idx)
    }
}

impl Shard {
    fn home(&self, fp_hi: u32) -> usize {
        ((u64::from(fp_hi) * self.slots.len() as u64) >> 32) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    fn find(&self, geo: Geometry, h: &Hashed) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }

        let mut i = self.home((h.fp >> 32) as u32);
        for _ in 0..self.slots.len() {
            let s = self.slots[i];
            if s == 0 {
                return None;
            }

            if geo.slot_tag(s) == h.tag {
                let idx = geo.slot_idx(s);
                if self
                    .entries
                    .get(idx)
                    .is_some_and(|e| e.fingerprint() == h.fp)
                {
                    return Some(idx);
                }
            }
            i = self.next(i);
        }
        None
    }

    /// The slot position that points at entry `idx`.
    fn slot_of(&self, geo: Geometry, idx: usize) -> Option<usize> {
        let mut i = self.home(self.entries.get(idx)?.fp_hi);
        for _ in 0..self.slots.len() {
            let s = self.slots[i];
            if s == 0 {
                return None;
            }

            if geo.slot_idx(s) == idx {
                return Some(i);
            }
            i = self.next(i);
        }
        None
    }

    fn place(&mut self, slot: u32, fp_hi: u32) {
        let mut i = self.home(fp_hi);
        while self.slots[i] != 0 {
            i = self.next(i);
        }
        self.slots[i] = slot;
    }

    /// Makes room for one more entry in the index and in `entries`.
    fn reserve_one(&mut self, geo: Geometry) {
        let needed = self.entries.len() + 1;
        if needed * LOAD_DEN > self.slots.len() * LOAD_NUM {
            let most = geo.per_shard * LOAD_DEN / LOAD_NUM + 1;
            let mut cap = (self.slots.len() + self.slots.len() / 2)
                .max(MIN_SLOTS)
                .min(most);
            while needed * LOAD_DEN > cap * LOAD_NUM {
                cap += cap / 2 + 1;
            }
            // Rebuilt from the entries in the same allocation (grown by realloc): freeing the
            // old index and allocating a new one leaves holes in the heap that RSS keeps.
            self.slots.clear();
            self.slots.reserve_exact(cap);
            self.slots.resize(cap, 0);
            for idx in 0..self.entries.len() {
                let entry = self.entries[idx];
                self.place(geo.slot(geo.tag(entry.fingerprint()), idx), entry.fp_hi);
            }
        }

        if self.entries.len() == self.entries.capacity() {
            let len = self.entries.len();
            // The first insert reserves the whole shard: address space only, the pages become
            // memory as entries fill them. Growing by reallocation instead leaves the blocks it
            // outgrew as holes in the heap, which RSS keeps (about 10 bytes per scope at 1M).
            let reserved = len == 0
                && self
                    .entries
                    .try_reserve_exact(geo.per_shard.min(MAX_RESERVED_ENTRIES))
                    .is_ok();
            if !reserved {
                let cap = (len + len / 2).max(4).min(geo.per_shard);
                self.entries.reserve_exact(cap.saturating_sub(len).max(1));
            }
        }
    }

    fn push_entry(&mut self, geo: Geometry, h: &Hashed, entry: Entry) -> usize {
        self.reserve_one(geo);
        let idx = self.entries.len();
        self.entries.push(entry);
        self.place(geo.slot(h.tag, idx), entry.fp_hi);
        idx
    }

    /// Removes entry `idx`, which must have no active record.
    fn remove_entry(&mut self, geo: Geometry, idx: usize) {
        let Some(mut hole) = self.slot_of(geo, idx) else {
            return;
        };

        let mut k = hole;
        loop {
            k = self.next(k);
            let s = self.slots[k];
            if s == 0 {
                break;
            }

            let wanted = self.home(self.entries[geo.slot_idx(s)].fp_hi);
            let cap = self.slots.len();
            let displaced = (k + cap - wanted) % cap;
            let gap = (k + cap - hole) % cap;
            if displaced >= gap {
                self.slots[hole] = s;
                hole = k;
            }
        }
        self.slots[hole] = 0;

        let last = self.entries.len() - 1;
        if idx != last {
            if let Some(pos) = self.slot_of(geo, last) {
                self.slots[pos] = geo.with_idx(self.slots[pos], idx);
            }
            let moved = self.entries[last];
            if let Some(r) = self.records.get_mut(moved.active as usize) {
                r.entry = idx as u32;
            }
        }
        self.entries.swap_remove(idx);
    }

    fn record(&self, entry: &Entry) -> Option<&Record> {
        if entry.active == NONE {
            return None;
        }
        self.records.get(entry.active as usize)
    }

    fn create_record(&mut self, entry_idx: usize, name: &str, fresh: bool) -> usize {
        let record = Record {
            name: Some(Arc::from(name)),
            entry: entry_idx as u32,
            fresh,
            ..Record::default()
        };
        self.name_bytes += name.len();
        self.live_records += 1;
        let ri = if let Some(ri) = self.free_records.pop() {
            let ri = ri as usize;
            self.records[ri] = record;
            ri
        } else {
            self.records.push(record);
            self.records.len() - 1
        };
        self.entries[entry_idx].active = ri as u32;
        ri
    }

    fn remove_record(&mut self, ri: usize) {
        let record = std::mem::take(&mut self.records[ri]);
        if let Some(name) = record.name {
            self.name_bytes -= name.len();
        }
        if let Some(e) = self.entries.get_mut(record.entry as usize) {
            e.active = NONE;
        }
        self.live_records -= 1;
        if self.live_records == 0 {
            self.records = Vec::new();
            self.free_records = Vec::new();
        } else {
            self.free_records.push(ri as u32);
        }
    }

    /// An entry to evict from a full shard: one with no active record whose window ended if
    /// the hand finds one soon, else the first with no active record, else the first whose
    /// record has nothing to push. An entry with unpushed charges is never evicted.
    fn pick_victim(&mut self, now: f64, window: u32) -> Option<usize> {
        let n = self.entries.len();
        if n == 0 {
            return None;
        }

        let start = self.hand % n;
        let mut fallback = None;
        let mut settled = None;
        for step in 0..n {
            let idx = (start + step) % n;
            let e = &self.entries[idx];
            if e.active != NONE {
                if settled.is_none()
                    && self
                        .records
                        .get(e.active as usize)
                        .is_some_and(Record::settled)
                {
                    settled = Some(idx);
                }
                if step >= 4 * VICTIM_SCAN && (fallback.is_some() || settled.is_some()) {
                    break;
                }
                continue;
            }

            if e.window_ended(now, window) {
                fallback = Some(idx);
                break;
            }
            if fallback.is_none() {
                fallback = Some(idx);
            }
            if step >= VICTIM_SCAN {
                break;
            }
        }
        let victim = fallback.or(settled);
        if let Some(idx) = victim {
            self.hand = idx + 1;
        }
        victim
    }

    /// Bytes of memory the shard holds: capacities, except that reserved entries count only
    /// up to the page the last entry is on (the rest is address space no one has touched).
    fn memory_bytes(&self) -> usize {
        let entries = (self.entries.len() * size_of::<Entry>())
            .next_multiple_of(PAGE_BYTES)
            .min(self.entries.capacity() * size_of::<Entry>());
        self.slots.capacity() * size_of::<u32>()
            + entries
            + self.records.capacity() * size_of::<Record>()
            + self.free_records.capacity() * size_of::<u32>()
            // An Arc<str> allocation holds two counters before the bytes.
            + self.name_bytes
            + self.live_records * 2 * size_of::<usize>()
    }
}

/// A shard on its own cache lines, so that threads on different shards do not share lines.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(RwLock<Shard>);

/// The verdict on one scope before any charge.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Ok,
    /// Seconds until the window ends, and what remains of each limit (-1 where none, or
    /// where the denial is not about the limit itself).
    Denied(f64, i64, i64),
    Load,
    Exact,
}

impl Verdict {
    /// Lower ranks win when several scopes decline.
    fn rank(self) -> u8 {
        match self {
            Verdict::Denied(..) => 0,
            Verdict::Load => 1,
            Verdict::Exact => 2,
            Verdict::Ok => 3,
        }
    }

    fn decision(self, index: usize) -> Decision {
        match self {
            Verdict::Denied(retry, left_req, left_tok) => Decision {
                remaining_requests: left_req,
                remaining_tokens: left_tok,
                ..Decision::not_admitted(Outcome::Denied, index, retry)
            },
            Verdict::Load => Decision::not_admitted(Outcome::Load, index, 0.0),
            Verdict::Exact => Decision::not_admitted(Outcome::Exact, index, 0.0),
            Verdict::Ok => Decision {
                outcome: Outcome::Admitted,
                index: None,
                remaining_requests: -1,
                remaining_tokens: -1,
                retry_after: 0.0,
            },
        }
    }
}

/// What one scope's check found in its shard.
#[derive(Clone, Copy, Debug)]
enum Found {
    Missing,
    Ended,
    /// The entry's record if any, and the verdict on the current pending deltas.
    Open {
        record: Option<usize>,
        verdict: Verdict,
    },
}

/// How a scope's lease follows its use across drains.
///
/// A scope is settled (synced) when its lease would not cover two more drains at the pace it
/// has used it since it was last settled, when it holds charges made without a lease, or
/// after `lease_drains` drains in any case; otherwise it waits, and a sync skips it. When
/// settled, it asks for a lease of `lease_drains + 1` drains at that pace, of which the part
/// beyond two drains is capped at a sixteenth of the limit (so that a proxy that dies, or a
/// proxy without the tier beside it, loses little of a tight limit to leases). With
/// `lease_drains` 1, every scope used is settled at every drain, to twice its last use.
#[derive(Clone, Copy, Debug)]
struct Pace {
    /// Drains since the scope was last settled, this one included (1 or more).
    drains: u32,
    lease_drains: u32,
}

impl Pace {
    /// `used` over the drains since the last settle, scaled to `drains` drains, rounded up.
    fn scaled(self, used: i64, drains: u32) -> i64 {
        let used = i128::from(used.max(0));
        let since = i128::from(self.drains.max(1));
        let v = (used * i128::from(drains) + since - 1) / since;
        v.clamp(0, i128::from(i64::MAX)) as i64
    }

    /// The lease a limited kind wants when settled: zero without a limit.
    fn want(self, limit: u32, used: i64, floor: u32) -> i64 {
        if limit == 0 {
            return 0;
        }
        let near = self.scaled(used, 2);
        let far = self.scaled(used, self.lease_drains.saturating_add(1));
        let cap = near.max(i64::from(limit.div_ceil(16)));
        far.min(cap).saturating_add(i64::from(floor))
    }

    /// A limited kind holds charges made without a lease, or a lease that will not last two
    /// more drains at its pace.
    fn runs_low(self, limit: u32, pend: i64, used: i64, floor: u32) -> bool {
        limit > 0 && (pend > 0 || -pend < self.scaled(used, 2).saturating_add(i64::from(floor)))
    }
}

/// Settles one kind of a record's pending delta at a drain against the lease it wants next:
/// returns what to push to Redis (charges made without a lease, minus lease given back) and
/// what lease to ask for on top of what it keeps. The pending delta becomes minus the lease
/// kept.
fn settle(pend: &mut i64, want: i64) -> (i64, i64) {
    let (mut push, mut held) = if *pend > 0 { (*pend, 0) } else { (0, -*pend) };
    if held > want {
        push -= held - want;
        held = want;
    }
    *pend = -held;
    (push, want - held)
}

fn clamp_u32(v: i64) -> u32 {
    v.clamp(0, i64::from(u32::MAX)) as u32
}

/// The rules of one scope, given its entry, its record and a pending delta to judge.
fn judge(
    entry: &Entry,
    record: Option<&Record>,
    lim: &ScopeLimit<'_>,
    req: &Request,
    pend_req: i64,
    pend_tok: i64,
) -> Verdict {
    let lr = i64::from(lim.rpm);
    let lt = i64::from(lim.tpm);
    let r = i64::from(req.requests);
    let t = i64::from(req.tokens);
    let ct = t.max(1);
    let proxies = i64::from(req.proxies.max(1));
    let g_req = i64::from(entry.g_req);
    let g_tok = i64::from(entry.g_tok);
    let retry = f64::from(entry.window_start) + f64::from(req.window) - req.now;

    let over_req = lr > 0 && g_req.saturating_add(pend_req).saturating_add(r) > lr;
    let over_tok = lt > 0 && g_tok.saturating_add(pend_tok).saturating_add(ct) > lt;
    if over_req || over_tok {
        let left = |limit: i64, used: i64| {
            if limit > 0 {
                limit.saturating_sub(used).max(0)
            } else {
                -1
            }
        };
        return Verdict::Denied(
            retry,
            left(lr, g_req.saturating_add(pend_req)),
            left(lt, g_tok.saturating_add(pend_tok)),
        );
    }

    let share_req = (lr - g_req).div_euclid(proxies);
    let share_tok = (lt - g_tok).div_euclid(proxies);
    let spent_req = lr > 0 && pend_req.saturating_add(r) > share_req;
    let spent_tok = lt > 0 && pend_tok.saturating_add(t) > share_tok;
    if req.offline {
        return if spent_req || spent_tok {
            Verdict::Denied(retry, -1, -1)
        } else {
            Verdict::Ok
        };
    }

    // A scope idle long enough to have lost its record gets one charge on trust, which the
    // next sync pushes; a second one waits for Redis. A tokens-only charge gets none: it
    // follows a request's own charge, which took the trust.
    if record.is_none_or(|rec| !rec.fresh) {
        return if r == 0 || record.is_some() && pend_req != 0 {
            Verdict::Load
        } else {
            Verdict::Ok
        };
    }

    // A fresh scope admits only within its lease: a negative pending delta is capacity that
    // Redis already counts as this proxy's, so spending it cannot overshoot the fleet.
    let leased_req = lr == 0 || pend_req.saturating_add(r) <= 0;
    let leased_tok = lt == 0 || pend_tok.saturating_add(t) <= 0;
    if leased_req && leased_tok {
        Verdict::Ok
    } else {
        Verdict::Exact
    }
}

fn look(shard: &Shard, geo: Geometry, h: &Hashed, lim: &ScopeLimit<'_>, req: &Request) -> Found {
    let Some(ei) = shard.find(geo, h) else {
        return Found::Missing;
    };

    let entry = &shard.entries[ei];
    if entry.window_ended(req.now, req.window) {
        return Found::Ended;
    }

    let record = shard.record(entry);
    let (pr, pt) = record.map_or((0, 0), |r| {
        (r.pend_req.load(Relaxed), r.pend_tok.load(Relaxed))
    });
    Found::Open {
        record: record.map(|_| entry.active as usize),
        verdict: judge(entry, record, lim, req, pr, pt),
    }
}

/// Charges one request and `req.tokens` tokens to a scope, re-validating the rules against the
/// pending deltas it swaps. Returns the remainders after the charge, or the verdict that
/// stopped it (nothing charged then).
fn charge(
    shard: &Shard,
    ei: usize,
    ri: usize,
    lim: &ScopeLimit<'_>,
    req: &Request,
) -> Result<(i64, i64), Verdict> {
    let entry = &shard.entries[ei];
    let record = &shard.records[ri];
    let r = i64::from(req.requests);
    let t = i64::from(req.tokens);

    let mut pr = record.pend_req.load(Relaxed);
    loop {
        let pt = record.pend_tok.load(Relaxed);
        let verdict = judge(entry, Some(record), lim, req, pr, pt);
        if verdict != Verdict::Ok {
            return Err(verdict);
        }

        match record
            .pend_req
            .compare_exchange_weak(pr, pr.saturating_add(r), Relaxed, Relaxed)
        {
            Ok(_) => break,
            Err(now) => pr = now,
        }
    }

    let mut pt = record.pend_tok.load(Relaxed);
    loop {
        let verdict = judge(entry, Some(record), lim, req, pr, pt);
        if verdict != Verdict::Ok {
            add_saturating(&record.pend_req, -r);
            return Err(verdict);
        }

        match record
            .pend_tok
            .compare_exchange_weak(pt, pt.saturating_add(t), Relaxed, Relaxed)
        {
            Ok(_) => break,
            Err(now) => pt = now,
        }
    }
    record.touched.store(true, Relaxed);
    add_saturating(&record.used_req, r);
    add_saturating(&record.used_tok, t);
    // Each kind's limit and estimate size its next lease; a check that charges a kind sets
    // them, so that a request's two steps in LiteLLM (its request against rpm, then its tokens
    // alone against tpm) do not clear each other's.
    if r > 0 {
        record.lim_req.store(lim.rpm, Relaxed);
    }
    if lim.tpm > 0 || t > 0 {
        record.lim_tok.store(lim.tpm, Relaxed);
        record.last_tokens.store(req.tokens, Relaxed);
    }

    let seen_req = i64::from(entry.g_req).saturating_add(pr).saturating_add(r);
    let seen_tok = i64::from(entry.g_tok).saturating_add(pt).saturating_add(t);
    let left_req = i64::from(lim.rpm).saturating_sub(seen_req);
    let left_tok = i64::from(lim.tpm).saturating_sub(seen_tok);
    Ok((left_req.max(0), left_tok.max(0)))
}

/// The counter table. Every method takes `&self` and is safe to call from many threads.
#[derive(Debug)]
pub struct Table {
    shards: Box<[Padded]>,
    geo: Geometry,
    key: (u64, u64),
    len: AtomicUsize,
    evictions: AtomicU64,
    rejected: AtomicU64,
    /// Where `evict` resumes: (shard, entry index).
    cursor: Mutex<(usize, usize)>,
}

impl Table {
    /// A table with a random hash key from the operating system.
    ///
    /// # Errors
    ///
    /// `max_scopes` is 0 or above `MAX_SCOPES`, `shards` is not a power of two up to
    /// `MAX_SHARDS`, or the operating system has no randomness to give.
    pub fn new(max_scopes: u64, shards: usize) -> Result<Self, ConfigError> {
        let mut buf = [0u8; 16];
        getrandom::getrandom(&mut buf).map_err(|e| ConfigError::Random(e.to_string()))?;
        let (k0, k1) = buf.split_at(8);
        let k0 = u64::from_le_bytes(k0.try_into().unwrap_or_default());
        let k1 = u64::from_le_bytes(k1.try_into().unwrap_or_default());
        Self::with_key(max_scopes, shards, (k0, k1))
    }

    /// A table with a given hash key (for tests).
    ///
    /// # Errors
    ///
    /// As `Table::new`, except for randomness.
    pub fn with_key(max_scopes: u64, shards: usize, key: (u64, u64)) -> Result<Self, ConfigError> {
        if max_scopes == 0 || max_scopes > MAX_SCOPES {
            return Err(ConfigError::MaxScopes(max_scopes));
        }
        if !shards.is_power_of_two() || shards > MAX_SHARDS {
            return Err(ConfigError::Shards(shards));
        }

        let per_shard = max_scopes.div_ceil(shards as u64) as usize;
        let idx_bits = u64::BITS - (per_shard as u64).leading_zeros();
        Ok(Self {
            shards: (0..shards).map(|_| Padded::default()).collect(),
            geo: Geometry {
                per_shard,
                idx_bits,
            },
            key,
            len: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            cursor: Mutex::new((0, 0)),
        })
    }

    fn hash(&self, name: &str) -> Hashed {
        let mut hasher = SipHasher13::new_with_keys(self.key.0, self.key.1);
        hasher.write(name.as_bytes());
        let h = hasher.finish128();
        Hashed {
            fp: h.h1,
            shard: (h.h2 as usize) & (self.shards.len() - 1),
            tag: self.geo.tag(h.h1),
        }
    }

    fn shard(&self, h: &Hashed) -> &RwLock<Shard> {
        &self.shards[h.shard].0
    }

    /// How many scopes are tracked.
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    /// Whether no scope is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inserts an entry into a locked shard, evicting an idle one when the shard is full.
    /// Returns `None` (and counts a rejection) when every entry of the shard is active.
    fn insert(
        &self,
        shard: &mut Shard,
        h: &Hashed,
        entry: Entry,
        now: f64,
        window: u32,
    ) -> Option<usize> {
        if shard.entries.len() >= self.geo.per_shard {
            let Some(victim) = shard.pick_victim(now, window) else {
                self.rejected.fetch_add(1, Relaxed);
                return None;
            };
            let active = shard.entries[victim].active;
            if active != NONE {
                shard.remove_record(active as usize);
            }
            shard.remove_entry(self.geo, victim);
            self.evictions.fetch_add(1, Relaxed);
            self.len.fetch_sub(1, Relaxed);
        }

        self.len.fetch_add(1, Relaxed);
        Some(shard.push_entry(self.geo, h, entry))
    }

    /// Checks one request against every scope and, if all admit it, charges every scope.
    pub fn check(&self, scopes: &[ScopeLimit<'_>], req: &Request) -> Decision {
        let hashed: SmallVec<[Hashed; 8]> = scopes.iter().map(|s| self.hash(s.name)).collect();
        let mut order: SmallVec<[usize; 8]> = hashed.iter().map(|h| h.shard).collect();
        order.sort_unstable();
        order.dedup();
        let at: SmallVec<[usize; 8]> = hashed
            .iter()
            .map(|h| order.partition_point(|&s| s < h.shard))
            .collect();

        {
            let guards: SmallVec<[RwLockReadGuard<'_, Shard>; 8]> =
                order.iter().map(|&s| self.shards[s].0.read()).collect();
            let view: SmallVec<[&Shard; 8]> = guards.iter().map(|g| &**g).collect();
            if let Some(decision) = self.check_read(&view, &at, &hashed, scopes, req) {
                return decision;
            }
        }

        let mut guards: SmallVec<[RwLockWriteGuard<'_, Shard>; 8]> =
            order.iter().map(|&s| self.shards[s].0.write()).collect();
        self.check_write(&mut guards, &at, &hashed, scopes, req)
    }

    /// The check under read locks; `None` when it needs the write locks (to create a record
    /// or, offline, to start a local window).
    fn check_read(
        &self,
        view: &[&Shard],
        at: &[usize],
        hashed: &[Hashed],
        scopes: &[ScopeLimit<'_>],
        req: &Request,
    ) -> Option<Decision> {
        let mut worst: Option<(usize, Verdict)> = None;
        let mut needs_write = false;
        for (i, (h, lim)) in hashed.iter().zip(scopes).enumerate() {
            let verdict = match look(view[at[i]], self.geo, h, lim, req) {
                Found::Missing | Found::Ended if req.offline => {
                    needs_write = true;
                    continue;
                }
                Found::Missing | Found::Ended => Verdict::Load,
                Found::Open {
                    record, verdict, ..
                } => {
                    needs_write |= record.is_none();
                    verdict
                }
            };
            if worst.is_none_or(|(_, w)| verdict.rank() < w.rank()) {
                worst = Some((i, verdict));
            }
        }

        // Online, a scope that declines decides the check without the write locks.
        let declined = worst.is_some_and(|(_, w)| w != Verdict::Ok);
        if needs_write && (req.offline || !declined) {
            return None;
        }
        if let Some((i, verdict)) = worst.filter(|(_, w)| *w != Verdict::Ok) {
            return Some(verdict.decision(i));
        }

        Some(Self::charge_all(view, at, hashed, scopes, req, self.geo))
    }

    /// The check under write locks: starts local windows (offline), judges, creates missing
    /// records and charges.
    fn check_write(
        &self,
        guards: &mut [RwLockWriteGuard<'_, Shard>],
        at: &[usize],
        hashed: &[Hashed],
        scopes: &[ScopeLimit<'_>],
        req: &Request,
    ) -> Decision {
        let mut rejected: SmallVec<[bool; 8]> = SmallVec::from_elem(false, scopes.len());
        if req.offline {
            for (i, h) in hashed.iter().enumerate() {
                let shard = &mut *guards[at[i]];
                rejected[i] = !self.start_local_window(shard, h, req);
            }
        }

        let mut worst: Option<(usize, Verdict)> = None;
        for (i, (h, lim)) in hashed.iter().zip(scopes).enumerate() {
            let verdict = if rejected[i] {
                Verdict::Denied(1.0, -1, -1)
            } else {
                match look(&guards[at[i]], self.geo, h, lim, req) {
                    Found::Missing | Found::Ended if req.offline => Verdict::Denied(1.0, -1, -1),
                    Found::Missing | Found::Ended => Verdict::Load,
                    Found::Open { verdict, .. } => verdict,
                }
            };
            if worst.is_none_or(|(_, w)| verdict.rank() < w.rank()) {
                worst = Some((i, verdict));
            }
        }
        if let Some((i, verdict)) = worst.filter(|(_, w)| *w != Verdict::Ok) {
            return verdict.decision(i);
        }

        for (i, (h, lim)) in hashed.iter().zip(scopes).enumerate() {
            let shard = &mut *guards[at[i]];
            if let Some(ei) = shard.find(self.geo, h) {
                if shard.entries[ei].active == NONE {
                    shard.create_record(ei, lim.name, false);
                }
            }
        }

        let view: SmallVec<[&Shard; 8]> = guards.iter().map(|g| &**g).collect();
        Self::charge_all(&view, at, hashed, scopes, req, self.geo)
    }

    /// Offline: gives a missing scope, or one whose window ended, a local window starting now
    /// with zero totals. False when the scope could not be tracked.
    fn start_local_window(&self, shard: &mut Shard, h: &Hashed, req: &Request) -> bool {
        let start = req.now.floor().clamp(0.0, f64::from(u32::MAX)) as u32;
        match shard.find(self.geo, h) {
            Some(ei) if shard.entries[ei].window_ended(req.now, req.window) => {
                let entry = &mut shard.entries[ei];
                entry.window_start = start;
                entry.g_req = 0;
                entry.g_tok = 0;
                let active = entry.active;
                if let Some(r) = shard.records.get_mut(active as usize) {
                    *r.pend_req.get_mut() = 0;
                    *r.pend_tok.get_mut() = 0;
                    r.pushed();
                }
                true
            }
            Some(_) => true,
            None => {
                let entry = new_entry(h, start, 0, 0);
                self.insert(shard, h, entry, req.now, req.window).is_some()
            }
        }
    }

    /// Charges every scope, all or nothing; every scope has an open entry with a record.
    fn charge_all(
        view: &[&Shard],
        at: &[usize],
        hashed: &[Hashed],
        scopes: &[ScopeLimit<'_>],
        req: &Request,
        geo: Geometry,
    ) -> Decision {
        let mut done: SmallVec<[(usize, usize, usize); 8]> = SmallVec::new();
        let mut left_req = i64::MAX;
        let mut left_tok = i64::MAX;
        let mut failure = None;
        for (i, (h, lim)) in hashed.iter().zip(scopes).enumerate() {
            let shard = view[at[i]];
            let target = shard
                .find(geo, h)
                .map(|ei| (ei, shard.entries[ei].active as usize))
                .filter(|&(_, ri)| shard.records.get(ri).is_some_and(|r| r.name.is_some()));
            let Some((ei, ri)) = target else {
                failure = Some((i, Verdict::Load));
                break;
            };

            match charge(shard, ei, ri, lim, req) {
                Ok((r, t)) => {
                    if lim.rpm > 0 {
                        left_req = left_req.min(r);
                    }
                    if lim.tpm > 0 {
                        left_tok = left_tok.min(t);
                    }
                    done.push((at[i], ri, i));
                }
                Err(verdict) => {
                    failure = Some((i, verdict));
                    break;
                }
            }
        }

        if let Some((i, verdict)) = failure {
            for &(s, ri, _) in &done {
                let record = &view[s].records[ri];
                add_saturating(&record.pend_req, -i64::from(req.requests));
                add_saturating(&record.pend_tok, -i64::from(req.tokens));
                add_saturating(&record.used_req, -i64::from(req.requests));
                add_saturating(&record.used_tok, -i64::from(req.tokens));
            }
            return verdict.decision(i);
        }

        Decision {
            outcome: Outcome::Admitted,
            index: None,
            remaining_requests: if left_req == i64::MAX { -1 } else { left_req },
            remaining_tokens: if left_tok == i64::MAX { -1 } else { left_tok },
            retry_after: 0.0,
        }
    }

    /// Sets a scope's fleet totals as Redis returned them, inserting the scope if needed.
    /// False when the scope could not be tracked.
    pub fn apply(&self, scope: &str, totals: &Totals, now: f64, window: u32) -> bool {
        let Totals {
            window_start,
            requests,
            tokens,
            lease_requests,
            lease_tokens,
        } = *totals;
        let h = self.hash(scope);
        let mut shard = self.shard(&h).write();
        let mut reset = false;
        let ei = if let Some(ei) = shard.find(self.geo, &h) {
            let entry = &mut shard.entries[ei];
            if window_start == entry.window_start {
                // Same window: the pending delta stays as it is.
            } else if now >= f64::from(window_start) + f64::from(window) {
                // A reply about a window that has already ended is stale: keep what we have.
                return true;
            } else {
                // Redis's open window wins, even over a later local one (opened while Redis
                // was unreachable). Pending deltas survive unless their own window has ended:
                // the sync charges a delta of an open window to Redis's open window.
                reset = entry.window_ended(now, window);
            }
            entry.window_start = window_start;
            entry.g_req = requests;
            entry.g_tok = tokens;
            ei
        } else {
            let entry = new_entry(&h, window_start, requests, tokens);
            match self.insert(&mut shard, &h, entry, now, window) {
                Some(ei) => ei,
                None => return false,
            }
        };

        let ri = match shard.entries[ei].active {
            NONE => shard.create_record(ei, scope, true),
            ri => ri as usize,
        };
        let record = &mut shard.records[ri];
        if reset {
            *record.pend_req.get_mut() = 0;
            *record.pend_tok.get_mut() = 0;
            record.pushed();
        }
        // Redis reserved the lease inside `requests`/`tokens`; locally it is spendable
        // capacity, kept as a negative pending delta.
        *record.pend_req.get_mut() -= i64::from(lease_requests);
        *record.pend_tok.get_mut() -= i64::from(lease_tokens);
        let lease = record.lease_req.get_mut();
        *lease = lease.saturating_add(i64::from(lease_requests));
        let lease = record.lease_tok.get_mut();
        *lease = lease.saturating_add(i64::from(lease_tokens));
        record.fresh = true;
        true
    }

    /// Settles the active records that are due (see `Pace`) for a sync: returns what each
    /// has to push and the lease it asks for, leaving minus the lease it keeps as its pending
    /// delta. A record untouched for `idle_drains` drains gives its whole lease back and is
    /// then removed (its scope becomes stale); records whose window ended are removed.
    pub fn drain(&self, now: f64, window: u32, idle_drains: u32, lease_drains: u32) -> Vec<Delta> {
        let mut out = Vec::new();
        for padded in &*self.shards {
            let mut shard = padded.0.write();
            let mut ri = 0;
            while ri < shard.records.len() {
                let ended = shard.records[ri].name.is_some()
                    && shard
                        .entries
                        .get(shard.records[ri].entry as usize)
                        .is_none_or(|e| e.window_ended(now, window));
                let record = &mut shard.records[ri];
                ri += 1;
                let Some(name) = record.name.clone() else {
                    continue;
                };
                if ended {
                    // Redis dropped the window's counts and leases with it.
                    shard.remove_record(ri - 1);
                    continue;
                }

                let touched = std::mem::take(record.touched.get_mut());
                record.idle = if touched {
                    0
                } else {
                    record.idle.saturating_add(1)
                };
                let releasing = record.idle >= idle_drains;
                let drains = record.unsettled.saturating_add(1);
                let (rpm, tpm) = (*record.lim_req.get_mut(), *record.lim_tok.get_mut());
                let last_tokens = *record.last_tokens.get_mut();
                let pace = Pace {
                    drains,
                    lease_drains,
                };
                let due = releasing
                    || drains >= lease_drains
                    || pace.runs_low(
                        rpm,
                        *record.pend_req.get_mut(),
                        *record.used_req.get_mut(),
                        1,
                    )
                    || pace.runs_low(
                        tpm,
                        *record.pend_tok.get_mut(),
                        *record.used_tok.get_mut(),
                        last_tokens,
                    );
                if !due {
                    // Its lease covers the next drains and nothing unleased waits: the scope
                    // is left for a later sync, its use accumulating to size the next lease.
                    record.unsettled = drains;
                    continue;
                }

                record.unsettled = 0;
                let used_req = std::mem::take(record.used_req.get_mut());
                let used_tok = std::mem::take(record.used_tok.get_mut());
                let want = |limit: u32, used: i64, floor: u32| -> i64 {
                    if releasing {
                        0
                    } else {
                        pace.want(limit, used, floor)
                    }
                };
                let want_req = want(rpm, used_req, 1);
                let want_tok = want(tpm, used_tok, last_tokens);
                let (push_req, top_req) = settle(record.pend_req.get_mut(), want_req);
                let (push_tok, top_tok) = settle(record.pend_tok.get_mut(), want_tok);
                record.pushed();

                let entry = record.entry as usize;
                // A scope used since it was last settled is synced even with nothing to
                // push, so that it reads the fleet's totals back.
                if touched || push_req != 0 || push_tok != 0 || top_req != 0 || top_tok != 0 {
                    out.push(Delta {
                        scope: name,
                        window_start: shard.entries.get(entry).map_or(0, |e| e.window_start),
                        requests: push_req,
                        tokens: push_tok,
                        want_requests: clamp_u32(top_req),
                        want_tokens: clamp_u32(top_tok),
                        rpm,
                        tpm,
                    });
                } else if releasing {
                    shard.remove_record(ri - 1);
                }
            }
        }
        out
    }

    /// Takes one scope's pending delta as `(window_start, requests, tokens)`.
    pub fn take(&self, scope: &str) -> Option<(u32, i64, i64)> {
        self.take_keeping(scope, (false, false))
    }

    /// `take`, except that a kind flagged in `keep_leases` (requests, tokens) keeps its lease
    /// (a negative pending delta) and gives up only its charges. For an exact check that has
    /// no limit of that kind to renew the lease with: a gateway may check a request against
    /// rpm and then its tokens alone against tpm, and each step must keep the other's lease.
    pub fn take_keeping(&self, scope: &str, keep_leases: (bool, bool)) -> Option<(u32, i64, i64)> {
        let h = self.hash(scope);
        let shard = self.shard(&h).read();
        let entry = &shard.entries[shard.find(self.geo, &h)?];
        let record = shard.record(entry)?;
        // What stays pending after the push is minus the lease then held.
        let take = |cell: &AtomicI64, lease: &AtomicI64, keep_lease: bool| {
            if keep_lease {
                let before = cell.fetch_min(0, Relaxed);
                lease.store(before.saturating_neg().max(0), Relaxed);
                before.max(0)
            } else {
                lease.store(0, Relaxed);
                cell.swap(0, Relaxed)
            }
        };
        Some((
            entry.window_start,
            take(&record.pend_req, &record.lease_req, keep_leases.0),
            take(&record.pend_tok, &record.lease_tok, keep_leases.1),
        ))
    }

    /// Adds `(requests, tokens)` to the pending delta of a scope whose window is open (and,
    /// with `want`, starts at `want`), creating its record if needed. False otherwise.
    fn add_pending(
        &self,
        scope: &str,
        want: Option<u32>,
        requests: i64,
        tokens: i64,
        now: f64,
        window: u32,
    ) -> bool {
        let h = self.hash(scope);
        let fits =
            |e: &Entry| !e.window_ended(now, window) && want.is_none_or(|ws| ws == e.window_start);
        {
            let shard = self.shard(&h).read();
            let Some(ei) = shard.find(self.geo, &h) else {
                return false;
            };
            let entry = &shard.entries[ei];
            if !fits(entry) {
                return false;
            }
            if let Some(record) = shard.record(entry) {
                record.add(requests, tokens);
                if want.is_none() {
                    add_saturating(&record.used_tok, tokens);
                }
                return true;
            }
        }

        let mut shard = self.shard(&h).write();
        let Some(ei) = shard.find(self.geo, &h) else {
            return false;
        };
        if !fits(&shard.entries[ei]) {
            return false;
        }
        let ri = match shard.entries[ei].active {
            NONE => shard.create_record(ei, scope, false),
            ri => ri as usize,
        };
        shard.records[ri].add(requests, tokens);
        if want.is_none() {
            // A correction is use: it sizes the next token lease as a charge does.
            add_saturating(&shard.records[ri].used_tok, tokens);
        }
        true
    }

    /// Drops every lease this process holds, keeping what was charged or corrected since each
    /// scope's last push. For when Redis has lost the leases, e.g. restarted empty. Returns
    /// how many scopes held one.
    pub fn forget_leases(&self) -> usize {
        let mut scopes = 0;
        for padded in &*self.shards {
            let shard = padded.0.read();
            for record in shard.records.iter().filter(|r| r.name.is_some()) {
                scopes += usize::from(record.forget_lease());
            }
        }
        scopes
    }

    /// `forget_leases` for one scope, whose window Redis lost. True when it held a lease.
    pub fn forget_lease(&self, scope: &str) -> bool {
        let h = self.hash(scope);
        let shard = self.shard(&h).read();
        shard
            .find(self.geo, &h)
            .and_then(|ei| shard.record(&shard.entries[ei]))
            .is_some_and(Record::forget_lease)
    }

    /// Gives back a delta that could not be pushed, if the scope still has the same window
    /// and it is still open. False when the delta was dropped.
    pub fn restore(
        &self,
        scope: &str,
        window_start: u32,
        requests: i64,
        tokens: i64,
        now: f64,
        window: u32,
    ) -> bool {
        self.add_pending(scope, Some(window_start), requests, tokens, now, window)
    }

    /// Adds a signed token correction to a tracked scope whose window is open; it counts as
    /// use, for the next token lease.
    pub fn record(&self, scope: &str, tokens: i64, now: f64, window: u32) -> bool {
        self.add_pending(scope, None, 0, tokens, now, window)
    }

    /// Evicts up to `budget` scopes with no active record whose window ended, resuming where
    /// the previous call stopped; looks at no more than about `4 * budget + 64` entries.
    pub fn evict(&self, now: f64, window: u32, budget: usize) -> usize {
        if budget == 0 {
            return 0;
        }

        let mut cursor = self.cursor.lock();
        let (mut si, mut pos) = *cursor;
        let mut looked = 0usize;
        let most = budget.saturating_mul(4).saturating_add(64);
        let mut evicted = 0usize;
        let mut visits = 0usize;
        while evicted < budget && looked < most && visits <= self.shards.len() {
            si %= self.shards.len();
            let mut shard = self.shards[si].0.write();
            while pos < shard.entries.len() && evicted < budget && looked < most {
                looked += 1;
                let e = &shard.entries[pos];
                if e.active == NONE && e.window_ended(now, window) {
                    shard.remove_entry(self.geo, pos);
                    evicted += 1;
                } else {
                    pos += 1;
                }
            }
            if pos >= shard.entries.len() {
                si += 1;
                pos = 0;
                visits += 1;
            }
        }
        *cursor = (si % self.shards.len(), pos);
        drop(cursor);

        self.len.fetch_sub(evicted, Relaxed);
        self.evictions.fetch_add(evicted as u64, Relaxed);
        evicted
    }

    /// Bytes of memory the table holds (as `stats().memory_bytes`), without looking at any
    /// record: cheap enough for every sync.
    pub fn memory_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|padded| padded.0.read().memory_bytes() as u64)
            .sum::<u64>()
            + self.own_bytes()
    }

    fn own_bytes(&self) -> u64 {
        (size_of::<Self>() + size_of_val(&*self.shards)) as u64
    }

    /// Counters and memory accounting.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            evictions: self.evictions.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            memory_bytes: self.own_bytes(),
            ..Stats::default()
        };
        for padded in &*self.shards {
            let shard = padded.0.read();
            stats.scopes += shard.entries.len() as u64;
            stats.active += shard.live_records as u64;
            stats.memory_bytes += shard.memory_bytes() as u64;
            stats.pending += shard
                .records
                .iter()
                .filter(|r| {
                    r.name.is_some()
                        && (r.pend_req.load(Relaxed) != 0 || r.pend_tok.load(Relaxed) != 0)
                })
                .count() as u64;
        }
        stats
    }
}

fn new_entry(h: &Hashed, window_start: u32, g_req: u32, g_tok: u32) -> Entry {
    Entry {
        fp_lo: h.fp as u32,
        fp_hi: (h.fp >> 32) as u32,
        window_start,
        g_req,
        g_tok,
        active: NONE,
    }
}

/// Size of one entry, for tests and reports.
pub const ENTRY_BYTES: usize = size_of::<Entry>();

#[cfg(test)]
mod tests;
