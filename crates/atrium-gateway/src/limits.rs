//! Request limits, exact within one gateway.
//!
//! Every request is admitted against two scopes at once — its key and its
//! tenant — under one lock, so concurrent requests see exact counts: with a
//! limit of 100 requests per minute, the 101st concurrent request is
//! refused however the 1,000 race. Per-minute limits are rolling windows
//! kept in 100 ms buckets; a request counts from its bucket until the
//! bucket is a whole minute old (so a window is 60.0–60.1 s: never more
//! than the limit in any 60 s). Tokens are charged when the request ends,
//! with its real usage; while it runs, an up-front estimate (an upper bound
//! of the prompt's tokens plus `max_tokens`) is reserved, so requests in
//! flight cannot together overspend a budget. The daily budget is per UTC
//! calendar day. Pure: time is passed in.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_core::limits::RequestLimits;

/// Width of one window bucket.
const BUCKET: Duration = Duration::from_millis(100);
/// Buckets in one minute.
const MINUTE_BUCKETS: u64 = 600;
const DAY_SECS: u64 = 86_400;

/// Time since the UNIX epoch (the caller's clock; tests pass their own).
pub type Now = Duration;

fn bucket_of(now: Now) -> u64 {
    (now.as_millis() / BUCKET.as_millis()) as u64
}

/// A rolling one-minute sum in buckets.
#[derive(Debug, Default)]
struct MinuteWindow {
    buckets: VecDeque<(u64, u64)>,
    total: u64,
}

impl MinuteWindow {
    fn expire(&mut self, now: Now) {
        let current = bucket_of(now);
        while let Some(&(b, n)) = self.buckets.front() {
            if b + MINUTE_BUCKETS > current {
                break;
            }
            self.total = self.total.saturating_sub(n);
            self.buckets.pop_front();
        }
    }

    fn add(&mut self, now: Now, n: u64) {
        if n == 0 {
            return;
        }
        let current = bucket_of(now);
        match self.buckets.back_mut() {
            Some((b, m)) if *b == current => *m = m.saturating_add(n),
            _ => self.buckets.push_back((current, n)),
        }
        self.total = self.total.saturating_add(n);
    }

    /// How long until at least `excess` units have left the window.
    fn time_to_free(&self, now: Now, excess: u64) -> Duration {
        let mut freed = 0;
        for &(b, n) in &self.buckets {
            freed = n.saturating_add(freed);
            if freed >= excess {
                let leaves =
                    Duration::from_millis((b + MINUTE_BUCKETS) * BUCKET.as_millis() as u64);
                return leaves.saturating_sub(now);
            }
        }
        // What blocks is reserved by requests still running: their tokens
        // are charged when they end.
        Duration::from_secs(1)
    }
}

#[derive(Debug, Default)]
struct ScopeState {
    requests: MinuteWindow,
    tokens: MinuteWindow,
    /// Estimates of the requests in flight, not yet charged.
    reserved_tokens: u64,
    /// (UTC day number, tokens charged that day).
    day: (u64, u64),
    in_flight: u64,
    /// What the site's other gateways admitted, as of the last sync.
    remote: Remote,
    /// Requests admitted and tokens charged here since the last report.
    unreported: (u64, u64),
    /// Requests admitted here since the last sync, and the site-wide
    /// requests in the window at that sync: this gateway's share of what
    /// remained is `(limit - synced) / gateways`.
    since_sync: u64,
    synced: u64,
}

/// The other gateways' counts for one scope.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    pub requests_minute: u64,
    pub tokens_minute: u64,
    pub tokens_day: u64,
}

impl ScopeState {
    fn day_used(&mut self, now: Now) -> u64 {
        let today = now.as_secs() / DAY_SECS;
        if self.day.0 != today {
            self.day = (today, 0);
        }
        self.day.1
    }

    /// Why `limits` refuses one more request estimated at `tokens`, if it
    /// does; `gateways` is how many gateways the site shares limits among.
    fn check(
        &mut self,
        limits: &RequestLimits,
        tokens: u64,
        now: Now,
        gateways: u64,
    ) -> Option<Exceeded> {
        self.requests.expire(now);
        self.tokens.expire(now);
        if let Some(max) = limits.max_concurrent_requests {
            if self.in_flight.saturating_add(1) > max {
                return Some(Exceeded::new(
                    LimitKind::ConcurrentRequests,
                    max,
                    self.in_flight,
                    1,
                    Duration::from_secs(1),
                ));
            }
        }
        if let Some(max) = limits.requests_per_minute {
            let used = self
                .requests
                .total
                .saturating_add(self.remote.requests_minute);
            if used.saturating_add(1) > max {
                // Local requests leave the window on a schedule we know;
                // other gateways' we do not, so wait at least for ours.
                let excess = (used.saturating_add(1) - max).min(self.requests.total.max(1));
                let wait = self.requests.time_to_free(now, excess);
                return Some(Exceeded::new(
                    LimitKind::RequestsPerMinute,
                    max,
                    used,
                    1,
                    wait,
                ));
            }
            // Several gateways: between syncs, take only this gateway's
            // share of what the site had left, so bursts on all of them at
            // once cannot each spend the whole remainder.
            let share = max.saturating_sub(self.synced).div_ceil(gateways.max(1));
            if gateways > 1 && self.since_sync.saturating_add(1) > share {
                return Some(Exceeded::new(
                    LimitKind::RequestsPerMinute,
                    max,
                    used,
                    1,
                    Duration::from_secs(1),
                ));
            }
        }
        if let Some(max) = limits.tokens_per_minute {
            let used = self
                .tokens
                .total
                .saturating_add(self.reserved_tokens)
                .saturating_add(self.remote.tokens_minute);
            if used.saturating_add(tokens) > max {
                let wait = if tokens > max {
                    Duration::ZERO
                } else {
                    self.tokens
                        .time_to_free(now, used.saturating_add(tokens) - max)
                };
                return Some(Exceeded::new(
                    LimitKind::TokensPerMinute,
                    max,
                    used,
                    tokens,
                    wait,
                ));
            }
        }
        if let Some(max) = limits.tokens_per_day {
            let used = self
                .day_used(now)
                .saturating_add(self.reserved_tokens)
                .saturating_add(self.remote.tokens_day);
            if used.saturating_add(tokens) > max {
                let midnight = (now.as_secs() / DAY_SECS + 1) * DAY_SECS;
                let wait = Duration::from_secs(midnight - now.as_secs());
                return Some(Exceeded::new(
                    LimitKind::TokensPerDay,
                    max,
                    used,
                    tokens,
                    wait,
                ));
            }
        }
        None
    }

    fn admit(&mut self, tokens: u64, now: Now) {
        self.requests.add(now, 1);
        self.reserved_tokens = self.reserved_tokens.saturating_add(tokens);
        self.in_flight = self.in_flight.saturating_add(1);
        self.since_sync = self.since_sync.saturating_add(1);
        self.unreported.0 = self.unreported.0.saturating_add(1);
    }

    fn finish(&mut self, reserved: u64, charged: u64, now: Now) {
        self.reserved_tokens = self.reserved_tokens.saturating_sub(reserved);
        self.in_flight = self.in_flight.saturating_sub(1);
        self.tokens.add(now, charged);
        self.day_used(now);
        self.day.1 = self.day.1.saturating_add(charged);
        self.unreported.1 = self.unreported.1.saturating_add(charged);
    }

    fn idle(&self) -> bool {
        self.in_flight == 0
            && self.requests.total == 0
            && self.tokens.total == 0
            && self.day.1 == 0
            && self.remote == Remote::default()
            && self.unreported == (0, 0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    ConcurrentRequests,
}

impl LimitKind {
    /// The field that sets this limit on a key or quota.
    pub fn field(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::ConcurrentRequests => "max_concurrent_requests",
        }
    }

    /// OpenAI's error `type` for a rate limit: `requests` or `tokens`.
    pub fn openai_type(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::ConcurrentRequests => "requests",
            LimitKind::TokensPerMinute | LimitKind::TokensPerDay => "tokens",
        }
    }
}

/// A refusal: which limit of which scope, the numbers, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub scope: ScopeKind,
    pub kind: LimitKind,
    pub limit: u64,
    pub used: u64,
    pub requested: u64,
    pub retry_after: Duration,
}

impl Exceeded {
    fn new(kind: LimitKind, limit: u64, used: u64, requested: u64, retry_after: Duration) -> Self {
        Exceeded {
            scope: ScopeKind::Key,
            kind,
            limit,
            used,
            requested,
            retry_after,
        }
    }

    /// Whole seconds for `Retry-After`, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    /// A request that can never fit (its estimate alone is over the limit).
    pub fn never_fits(&self) -> bool {
        self.requested > self.limit
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    Key,
    Tenant,
}

impl ScopeKind {
    pub fn word(self) -> &'static str {
        match self {
            ScopeKind::Key => "key",
            ScopeKind::Tenant => "tenant",
        }
    }
}

/// One scope a request is counted in, with the limits that apply to it.
#[derive(Debug, Clone)]
pub struct Scoped<'a> {
    pub kind: ScopeKind,
    pub id: &'a str,
    pub limits: RequestLimits,
}

/// The limiter of one gateway.
#[derive(Debug)]
pub struct Limiter {
    scopes: Mutex<HashMap<(ScopeKind, String), ScopeState>>,
    /// Gateways of the site sharing the limits (1 until a sync says more).
    gateways: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            scopes: Mutex::default(),
            gateways: AtomicU64::new(1),
        }
    }
}

/// What one scope admitted here since the last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub scope: (ScopeKind, String),
    pub requests: u64,
    pub tokens: u64,
}

/// An admitted request's hold on its scopes. Dropping it ends the request:
/// its reservation is released and what it was charged is counted.
#[derive(Debug)]
pub struct Ticket {
    limiter: Arc<Limiter>,
    scopes: Vec<(ScopeKind, String)>,
    reserved: u64,
    charged: u64,
    clock: fn() -> Now,
}

impl Ticket {
    /// Records the request's real token usage, charged when it ends.
    pub fn charge(&mut self, tokens: u64) {
        self.charged = tokens;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let now = (self.clock)();
        if let Ok(mut scopes) = self.limiter.scopes.lock() {
            for s in &self.scopes {
                if let Some(state) = scopes.get_mut(s) {
                    state.finish(self.reserved, self.charged, now);
                }
            }
        }
    }
}

/// The wall clock, as the limiter counts it.
pub fn system_now() -> Now {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

impl Limiter {
    /// Admits one request estimated at `tokens` in every scope, or refuses
    /// it naming the first limit it would break; all-or-nothing.
    pub fn admit(
        self: &Arc<Self>,
        scopes: &[Scoped<'_>],
        tokens: u64,
        clock: fn() -> Now,
    ) -> Result<Option<Ticket>, Exceeded> {
        // Each scope's key is built once: it is the ticket's to keep, and
        // the map is searched with it (on every request's path).
        let mut held: Vec<(ScopeKind, String)> = Vec::with_capacity(scopes.len());
        let mut limits = Vec::with_capacity(scopes.len());
        for s in scopes.iter().filter(|s| !s.limits.is_unlimited()) {
            held.push((s.kind, s.id.to_string()));
            limits.push(s.limits);
        }
        if held.is_empty() {
            return Ok(None);
        }
        let now = clock();
        let gateways = self.gateways.load(Ordering::Relaxed);
        let Ok(mut states) = self.scopes.lock() else {
            // A panic while holding the lock is a bug elsewhere; refuse
            // rather than admit unmetered.
            return Err(Exceeded::new(
                LimitKind::ConcurrentRequests,
                0,
                0,
                1,
                Duration::from_secs(1),
            ));
        };
        for (key, limits) in held.iter().zip(&limits) {
            let state = match states.get_mut(key) {
                Some(state) => state,
                None => states.entry(key.clone()).or_default(),
            };
            if let Some(mut e) = state.check(limits, tokens, now, gateways) {
                e.scope = key.0;
                return Err(e);
            }
        }
        for key in &held {
            if let Some(state) = states.get_mut(key) {
                state.admit(tokens, now);
            }
        }
        Ok(Some(Ticket {
            limiter: self.clone(),
            scopes: held,
            reserved: tokens,
            charged: 0,
            clock,
        }))
    }

    /// Takes what every scope admitted since the last report.
    pub fn take_deltas(&self) -> Vec<Delta> {
        let Ok(mut states) = self.scopes.lock() else {
            return Vec::new();
        };
        states
            .iter_mut()
            .filter(|(_, s)| s.unreported != (0, 0))
            .map(|(k, s)| {
                let (requests, tokens) = std::mem::take(&mut s.unreported);
                Delta {
                    scope: k.clone(),
                    requests,
                    tokens,
                }
            })
            .collect()
    }

    /// Puts back deltas a failed report did not deliver.
    pub fn restore_deltas(&self, deltas: Vec<Delta>) {
        if let Ok(mut states) = self.scopes.lock() {
            for d in deltas {
                let s = states.entry(d.scope).or_default();
                s.unreported.0 = s.unreported.0.saturating_add(d.requests);
                s.unreported.1 = s.unreported.1.saturating_add(d.tokens);
            }
        }
    }

    /// Takes in a sync's answer: the site's gateway count and the other
    /// gateways' counts (scopes absent from `remote` have none).
    pub fn apply_sync(
        &self,
        gateways: u64,
        remote: &HashMap<(ScopeKind, String), Remote>,
        now: Now,
    ) {
        self.gateways.store(gateways.max(1), Ordering::Relaxed);
        let Ok(mut states) = self.scopes.lock() else {
            return;
        };
        for key in remote.keys() {
            states.entry(key.clone()).or_default();
        }
        for (key, s) in states.iter_mut() {
            s.remote = remote.get(key).copied().unwrap_or_default();
            s.requests.expire(now);
            s.since_sync = 0;
            s.synced = s.requests.total.saturating_add(s.remote.requests_minute);
        }
    }

    /// Forgets scopes with nothing in their windows (bounded memory for
    /// gateways serving many keys).
    pub fn sweep(&self, now: Now) {
        if let Ok(mut states) = self.scopes.lock() {
            states.retain(|_, s| {
                s.requests.expire(now);
                s.tokens.expire(now);
                s.day_used(now);
                !s.idle()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static CLOCK_MS: AtomicU64 = AtomicU64::new(0);
    fn test_clock() -> Now {
        Duration::from_millis(CLOCK_MS.load(Ordering::SeqCst))
    }

    fn key(limits: RequestLimits) -> Vec<Scoped<'static>> {
        // Each limit kind on a key of its own, so the cases do not mix
        // (the id lives as long as the test process).
        vec![Scoped {
            kind: ScopeKind::Key,
            id: Box::leak(format!("{limits:?}").into_boxed_str()),
            limits,
        }]
    }

    #[test]
    fn huge_estimates_never_wrap_past_a_limit() {
        let limiter = Arc::new(Limiter::default());
        for limits in [
            RequestLimits {
                tokens_per_minute: Some(100),
                ..Default::default()
            },
            RequestLimits {
                tokens_per_day: Some(100),
                ..Default::default()
            },
        ] {
            let scopes = key(limits);
            let mut t = limiter.admit(&scopes, 10, system_now).unwrap().unwrap();
            t.charge(10);
            drop(t);
            for huge in [u64::MAX, u64::MAX - 5, u64::MAX / 2 + 1] {
                let e = limiter.admit(&scopes, huge, system_now).unwrap_err();
                assert!(e.never_fits(), "{e:?}");
            }
            // A usage charge past any sum saturates rather than wraps.
            let mut t = limiter.admit(&scopes, 1, system_now).unwrap().unwrap();
            t.charge(u64::MAX);
            drop(t);
            assert!(limiter.admit(&scopes, 1, system_now).is_err());
        }
    }

    // One test drives the shared clock, so the cases run in sequence.
    #[test]
    fn limits_hold_exactly_and_recover_with_time() {
        let day = DAY_SECS * 1000;
        CLOCK_MS.store(day * 20_000 + 1_000, Ordering::SeqCst);
        let limiter = Arc::new(Limiter::default());

        // Requests per minute: exactly the limit, then a refusal whose
        // Retry-After is when the first bucket leaves the window.
        let rpm = key(RequestLimits {
            requests_per_minute: Some(3),
            ..Default::default()
        });
        let mut tickets = Vec::new();
        for _ in 0..3 {
            tickets.push(limiter.admit(&rpm, 0, test_clock).unwrap());
        }
        CLOCK_MS.fetch_add(20_000, Ordering::SeqCst);
        let e = limiter.admit(&rpm, 0, test_clock).unwrap_err();
        assert_eq!(
            (e.kind, e.limit, e.used),
            (LimitKind::RequestsPerMinute, 3, 3)
        );
        assert_eq!(e.retry_after_secs(), 40);
        drop(tickets);
        CLOCK_MS.fetch_add(40_000, Ordering::SeqCst);
        assert!(limiter.admit(&rpm, 0, test_clock).is_ok(), "a minute later");

        // Concurrency: the ticket's drop frees the slot.
        let conc = vec![Scoped {
            kind: ScopeKind::Tenant,
            id: "t",
            limits: RequestLimits {
                max_concurrent_requests: Some(1),
                ..Default::default()
            },
        }];
        let held = limiter.admit(&conc, 0, test_clock).unwrap();
        let e = limiter.admit(&conc, 0, test_clock).unwrap_err();
        assert_eq!(
            (e.scope, e.kind),
            (ScopeKind::Tenant, LimitKind::ConcurrentRequests)
        );
        drop(held);
        assert!(limiter.admit(&conc, 0, test_clock).is_ok());

        // Tokens: reservations count while in flight, real usage after.
        let tpm = key(RequestLimits {
            tokens_per_minute: Some(100),
            ..Default::default()
        });
        let mut a = limiter.admit(&tpm, 60, test_clock).unwrap().unwrap();
        let e = limiter.admit(&tpm, 50, test_clock).unwrap_err();
        assert_eq!(
            (e.kind, e.used, e.requested),
            (LimitKind::TokensPerMinute, 60, 50)
        );
        a.charge(20);
        drop(a);
        let b = limiter.admit(&tpm, 80, test_clock).unwrap();
        drop(b); // charged nothing (a failed request)
        let e = limiter.admit(&tpm, 200, test_clock).unwrap_err();
        assert!(e.never_fits());

        // Daily budget: resets at UTC midnight.
        let tpd = key(RequestLimits {
            tokens_per_day: Some(10),
            ..Default::default()
        });
        let mut c = limiter.admit(&tpd, 10, test_clock).unwrap().unwrap();
        c.charge(10);
        drop(c);
        let e = limiter.admit(&tpd, 1, test_clock).unwrap_err();
        assert_eq!(e.kind, LimitKind::TokensPerDay);
        let until_midnight = e.retry_after_secs();
        CLOCK_MS.fetch_add(until_midnight * 1000, Ordering::SeqCst);
        assert!(limiter.admit(&tpd, 1, test_clock).is_ok(), "a new day");

        // Both scopes or neither: a refusal by the tenant leaves the key's
        // counts untouched.
        let both = vec![
            Scoped {
                kind: ScopeKind::Key,
                id: "k2",
                limits: RequestLimits {
                    requests_per_minute: Some(1),
                    ..Default::default()
                },
            },
            Scoped {
                kind: ScopeKind::Tenant,
                id: "t2",
                limits: RequestLimits {
                    max_concurrent_requests: Some(1),
                    ..Default::default()
                },
            },
        ];
        let hold_tenant = limiter.admit(&both[1..], 0, test_clock).unwrap();
        assert_eq!(
            limiter.admit(&both, 0, test_clock).unwrap_err().scope,
            ScopeKind::Tenant
        );
        drop(hold_tenant);
        assert!(
            limiter.admit(&both, 0, test_clock).is_ok(),
            "the key's minute was not spent"
        );

        // Unlimited scopes keep no state.
        assert!(limiter
            .admit(&key(RequestLimits::default()), 5, test_clock)
            .unwrap()
            .is_none());
        CLOCK_MS.fetch_add(DAY_SECS * 1000, Ordering::SeqCst);
        limiter.sweep(test_clock());
        assert!(
            !limiter.scopes.lock().unwrap().is_empty(),
            "kept until reported"
        );
        assert!(!limiter.take_deltas().is_empty());
        limiter.sweep(test_clock());
        assert!(limiter.scopes.lock().unwrap().is_empty());
    }

    #[test]
    fn gateways_of_a_site_count_each_other_and_take_shares() {
        let limiter = Arc::new(Limiter::default());
        let scopes = key(RequestLimits {
            requests_per_minute: Some(100),
            tokens_per_day: Some(1000),
            ..Default::default()
        });
        let id = (ScopeKind::Key, scopes[0].id.to_string());
        let admitted = |n| {
            (0..n)
                .filter(|_| limiter.admit(&scopes, 1, system_now).is_ok())
                .count()
        };
        // Two gateways, nothing spent yet: this one takes half.
        limiter.apply_sync(2, &HashMap::new(), system_now());
        assert_eq!(admitted(80), 50);
        let deltas = limiter.take_deltas();
        assert_eq!((deltas[0].requests, deltas[0].tokens), (50, 0));
        // The other gateway spent 30: 20 remain, this one's share is 10.
        let mut remote = HashMap::from([(
            id.clone(),
            Remote {
                requests_minute: 30,
                tokens_minute: 0,
                tokens_day: 0,
            },
        )]);
        limiter.apply_sync(2, &remote, system_now());
        assert_eq!(admitted(30), 10);
        // The other gateway gone, its requests still in the window: 60 here
        // and 30 there leave 10 of the 100.
        limiter.apply_sync(1, &remote, system_now());
        assert_eq!(admitted(30), 10, "the rest of the 100");
        // Tokens the others charged today count against the daily budget.
        remote.insert(
            id.clone(),
            Remote {
                requests_minute: 0,
                tokens_minute: 0,
                tokens_day: 1000,
            },
        );
        limiter.apply_sync(1, &remote, system_now());
        let e = limiter.admit(&scopes, 1, system_now).unwrap_err();
        assert_eq!(e.kind, LimitKind::TokensPerDay);
        // A failed report puts its deltas back.
        let deltas = limiter.take_deltas();
        assert_eq!(deltas[0].requests, 20);
        limiter.restore_deltas(deltas);
        assert_eq!(limiter.take_deltas()[0].requests, 20);
    }

    #[test]
    fn concurrent_admission_is_exact() {
        let limiter = Arc::new(Limiter::default());
        let scopes = key(RequestLimits {
            requests_per_minute: Some(100),
            ..Default::default()
        });
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..125 {
                        if limiter.admit(&scopes, 0, system_now).is_ok() {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::SeqCst), 100);
    }
}
