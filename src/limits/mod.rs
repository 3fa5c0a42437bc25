//! Admission limits that break reconnect storms before they reach the backend.
//!
//! - [`LimitState`]: a rule's `limit` action: a GCRA rate (governor) per rule, per device or per
//!   client IP, plus a cap on concurrent connections admitted by the rule. State is kept in a
//!   [`LimitStore`] by rule name so that a rules reload does not reset counters or forget open
//!   connections.
//! - [`backoff::Backoff`]: devices (or IPs) that are refused or disconnect too often get an
//!   exponentially growing penalty during which they are refused without backend contact.
//! - [`GlobalLimits`]: process-wide caps from `fwgate.toml`.
//!
//! Memory is bounded: keyed state is a 64-bit hash of the key plus governor's 8-byte state
//! (about 40 bytes with the map's overhead), capped at `max_keys` per limiter; idle keys are
//! evicted every [`SWEEP_INTERVAL`]. When a table is full, every key of that limiter shares one
//! overflow bucket until eviction frees room: it limits more, never less.

pub mod backoff;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Keyed limiter state kept at most (per limiter) unless `[limits] max_keys` says otherwise.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
/// How often idle keys are evicted and the key gauges refreshed.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Retry-After for a refusal whose release time is unknown (a concurrency cap), before jitter.
pub const DEFAULT_CAP_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The key every caller shares once a keyed table is full.
const OVERFLOW_KEY: u64 = u64::MAX;

/// A rate such as `50/s`, `300/m`, `1000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Admissions per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// Parses `N/s`, `N/m` or `N/h`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let (n, unit) = text.trim().split_once('/').ok_or_else(|| {
            format!("rate {text:?} must look like \"50/s\", \"300/m\" or \"1000/h\"")
        })?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("rate {text:?}: {n:?} is not a whole number"))?;
        let count =
            NonZeroU32::new(count).ok_or_else(|| format!("rate {text:?} must be more than 0"))?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("rate {text:?}: unit {other:?} must be s, m or h")),
        };
        Ok(Rate { count, per })
    }

    /// The GCRA quota: one admission every `per / count`, bursting up to `burst` (default `count`).
    pub fn quota(&self, burst: Option<NonZeroU32>) -> Quota {
        let period = (self.per / self.count.get()).max(Duration::from_nanos(1));
        // `with_period` only fails for a zero period, which the max() above rules out.
        Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(self.count))
            .allow_burst(burst.unwrap_or(self.count))
    }
}

/// What a limit is counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// One budget for the whole rule.
    Rule,
    /// One budget per device id (the client IP when no device id is found).
    Device,
    /// One budget per client IP.
    Ip,
}

impl LimitKey {
    /// `"rule"`, `"device"` or `"ip"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKey::Rule => "rule",
            LimitKey::Device => "device",
            LimitKey::Ip => "ip",
        }
    }
}

/// A hash of whatever identifies a caller, for keyed state (no string is stored).
pub fn key_hash(device: Option<&[u8]>, ip: IpAddr, key: LimitKey) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match (key, device) {
        (LimitKey::Rule, _) => return 0,
        (LimitKey::Device, Some(d)) => {
            0u8.hash(&mut h);
            d.hash(&mut h);
        }
        (LimitKey::Device, None) | (LimitKey::Ip, _) => {
            1u8.hash(&mut h);
            ip.hash(&mut h);
        }
    }
    // Keep the overflow key reserved.
    h.finish().min(OVERFLOW_KEY - 1)
}

/// The configuration of one limit (compared to decide whether state survives a reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSpec {
    /// Rate and burst, if any.
    pub rate: Option<(Rate, Option<NonZeroU32>)>,
    /// What the rate is counted by.
    pub key: LimitKey,
    /// Cap on concurrent connections admitted by the rule, if any.
    pub max_connections: Option<usize>,
}

enum Limiter {
    Direct(DefaultDirectRateLimiter),
    Keyed(DefaultKeyedRateLimiter<u64>),
}

/// The live state of one rule's limit.
pub struct LimitState {
    spec: LimitSpec,
    limiter: Option<Limiter>,
    open: Arc<AtomicUsize>,
    max_keys: usize,
    clock: DefaultClock,
}

impl std::fmt::Debug for LimitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitState")
            .field("spec", &self.spec)
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish()
    }
}

/// Holds one of a rule's concurrent-connection slots; released when dropped.
#[derive(Debug)]
pub struct ConnPermit(Arc<AtomicUsize>);

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Result of a limit check.
#[derive(Debug)]
pub enum LimitOutcome {
    /// Admitted; keep the permit (if any) for as long as the connection is open.
    Admit(Option<ConnPermit>),
    /// Over the rate: admissible again after this long.
    RateLimited(Duration),
    /// Over the concurrency cap.
    AtCapacity,
}

impl LimitState {
    fn new(spec: LimitSpec, open: Arc<AtomicUsize>, max_keys: usize) -> LimitState {
        let limiter = spec.rate.map(|(rate, burst)| match spec.key {
            LimitKey::Rule => Limiter::Direct(RateLimiter::direct(rate.quota(burst))),
            _ => Limiter::Keyed(RateLimiter::keyed(rate.quota(burst))),
        });
        LimitState {
            spec,
            limiter,
            open,
            max_keys,
            clock: DefaultClock::default(),
        }
    }

    /// The configuration.
    pub fn spec(&self) -> &LimitSpec {
        &self.spec
    }

    /// Connections currently holding a permit.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Keys currently held by the keyed limiter.
    pub fn keys(&self) -> usize {
        match &self.limiter {
            Some(Limiter::Keyed(k)) => k.len(),
            _ => 0,
        }
    }

    /// Checks one admission for `key` (see [`key_hash`]). Lock-free except for the keyed map's
    /// shard lock; no allocation unless a new key is inserted.
    pub fn check(&self, key: u64) -> LimitOutcome {
        let permit = match self.spec.max_connections {
            None => None,
            Some(max) => {
                let taken = self
                    .open
                    .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                        (n < max).then_some(n + 1)
                    });
                if taken.is_err() {
                    return LimitOutcome::AtCapacity;
                }
                Some(ConnPermit(self.open.clone()))
            }
        };
        let verdict = match &self.limiter {
            None => Ok(()),
            Some(Limiter::Direct(l)) => l.check().map_err(|n| n.wait_time_from(self.clock.now())),
            Some(Limiter::Keyed(l)) => {
                let key = if l.len() >= self.max_keys {
                    OVERFLOW_KEY
                } else {
                    key
                };
                l.check_key(&key)
                    .map_err(|n| n.wait_time_from(self.clock.now()))
            }
        };
        match verdict {
            Ok(()) => LimitOutcome::Admit(permit),
            // Dropping the permit gives the slot back.
            Err(wait) => LimitOutcome::RateLimited(wait),
        }
    }

    /// Evicts keys whose state has fully recovered; returns the keys left.
    pub fn sweep(&self) -> usize {
        match &self.limiter {
            Some(Limiter::Keyed(l)) => {
                l.retain_recent();
                l.shrink_to_fit();
                l.len()
            }
            _ => 0,
        }
    }
}

/// A cap on things open at once (0: unlimited), handing out [`ConnPermit`]s.
#[derive(Debug, Default)]
pub struct Capacity {
    max: usize,
    open: Arc<AtomicUsize>,
}

impl Capacity {
    /// A cap of `max` (0: unlimited, only counted).
    pub fn new(max: usize) -> Capacity {
        Capacity {
            max,
            open: Arc::default(),
        }
    }

    /// Takes a slot, or None when full.
    pub fn try_take(&self) -> Option<ConnPermit> {
        if self.max == 0 {
            self.open.fetch_add(1, Ordering::Relaxed);
            return Some(ConnPermit(self.open.clone()));
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnPermit(self.open.clone()))
    }

    /// Slots taken.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// How long the state of a rule that disappeared from the rules file is kept, in case it
/// comes back (a transient edit must not refill every bucket).
pub const UNUSED_STATE_GRACE: Duration = Duration::from_secs(600);

/// Limit state by rule name, kept across reloads: unchanged limits keep their buckets, and the
/// count of open connections survives any change to the rule.
#[derive(Debug)]
pub struct LimitStore {
    max_keys: usize,
    states: Mutex<HashMap<String, Stored>>,
}

#[derive(Debug, Clone)]
struct Stored {
    state: Arc<LimitState>,
    unused_since: Option<std::time::Instant>,
}

impl Default for LimitStore {
    fn default() -> Self {
        LimitStore::new(DEFAULT_MAX_KEYS)
    }
}

impl LimitStore {
    /// A store whose keyed limiters hold at most `max_keys` keys each.
    pub fn new(max_keys: usize) -> LimitStore {
        LimitStore {
            max_keys: max_keys.max(1),
            states: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state for `rule` with `spec`: the existing one when the spec is unchanged.
    pub fn get(&self, rule: &str, spec: LimitSpec) -> Arc<LimitState> {
        let mut states = self.lock();
        if let Some(s) = states.get(rule) {
            if s.state.spec == spec {
                return s.state.clone();
            }
        }
        let open = states
            .get(rule)
            .map(|s| s.state.open.clone())
            .unwrap_or_default();
        let state = Arc::new(LimitState::new(spec, open, self.max_keys));
        states.insert(
            rule.to_string(),
            Stored {
                state: state.clone(),
                unused_since: None,
            },
        );
        state
    }

    /// Takes over state created elsewhere (the initial rules compiled before the gate existed).
    pub fn adopt(&self, rule: &str, state: Arc<LimitState>) {
        self.lock().insert(
            rule.to_string(),
            Stored {
                state,
                unused_since: None,
            },
        );
    }

    /// Marks the state of rules not in `rules` as unused; [`LimitStore::sweep`] forgets it after
    /// [`UNUSED_STATE_GRACE`].
    pub fn retain(&self, rules: &HashSet<&str>) {
        let now = std::time::Instant::now();
        for (name, stored) in self.lock().iter_mut() {
            if rules.contains(name.as_str()) {
                stored.unused_since = None;
            } else {
                stored.unused_since.get_or_insert(now);
            }
        }
    }

    /// Evicts idle keys everywhere and forgets long-unused rules; returns the total keys left.
    pub fn sweep(&self) -> usize {
        let states: Vec<Arc<LimitState>> = {
            let mut map = self.lock();
            map.retain(|_, s| {
                s.unused_since
                    .is_none_or(|t| t.elapsed() < UNUSED_STATE_GRACE)
            });
            map.values().map(|s| s.state.clone()).collect()
        };
        states.iter().map(|s| s.sweep()).sum()
    }
}

/// Process-wide caps from `[limits]` (all optional).
pub struct GlobalLimits {
    connections: Capacity,
    handshake_rate: Option<DefaultDirectRateLimiter>,
    per_ip: Option<DefaultKeyedRateLimiter<u64>>,
    max_keys: usize,
}

impl GlobalLimits {
    /// Builds the caps; `None` rates mean unlimited.
    pub fn new(
        max_connections: usize,
        handshake_rate: Option<Rate>,
        per_ip_rate: Option<Rate>,
        max_keys: usize,
    ) -> GlobalLimits {
        GlobalLimits {
            connections: Capacity::new(max_connections),
            handshake_rate: handshake_rate.map(|r| RateLimiter::direct(r.quota(None))),
            per_ip: per_ip_rate.map(|r| RateLimiter::keyed(r.quota(None))),
            max_keys: max_keys.max(1),
        }
    }

    /// Takes a connection slot, or None when `max_connections` are open.
    pub fn connection(&self) -> Option<ConnPermit> {
        self.connections.try_take()
    }

    /// Open device connections.
    pub fn open_connections(&self) -> usize {
        self.connections.open()
    }

    /// Whether a request from `ip` is within the per-IP rate.
    pub fn per_ip_ok(&self, ip: IpAddr) -> bool {
        match &self.per_ip {
            None => true,
            Some(l) => {
                let key = if l.len() >= self.max_keys {
                    OVERFLOW_KEY
                } else {
                    key_hash(None, ip, LimitKey::Ip)
                };
                l.check_key(&key).is_ok()
            }
        }
    }

    /// Whether one more admission fits the global handshake rate.
    pub fn handshake_ok(&self) -> bool {
        self.handshake_rate
            .as_ref()
            .is_none_or(|l| l.check().is_ok())
    }

    /// Evicts idle per-IP keys; returns the keys left.
    pub fn sweep(&self) -> usize {
        match &self.per_ip {
            Some(l) => {
                l.retain_recent();
                l.shrink_to_fit();
                l.len()
            }
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rate: &str, burst: u32, key: LimitKey, max: Option<usize>) -> LimitSpec {
        LimitSpec {
            rate: Some((Rate::parse(rate).unwrap(), NonZeroU32::new(burst))),
            key,
            max_connections: max,
        }
    }

    #[test]
    fn rates_parse_with_clear_errors() {
        assert_eq!(Rate::parse("50/s").unwrap().count.get(), 50);
        assert_eq!(Rate::parse("300/m").unwrap().per, Duration::from_secs(60));
        assert_eq!(
            Rate::parse(" 2 / h ").unwrap().per,
            Duration::from_secs(3600)
        );
        for bad in ["50", "0/s", "x/s", "5/d", "-1/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn burst_then_refusals_with_a_wait() {
        let s = LimitState::new(spec("1/m", 3, LimitKey::Rule, None), Arc::default(), 10);
        for _ in 0..3 {
            assert!(matches!(s.check(0), LimitOutcome::Admit(None)));
        }
        match s.check(0) {
            LimitOutcome::RateLimited(wait) => {
                assert!(
                    wait > Duration::from_secs(10) && wait <= Duration::from_secs(60),
                    "{wait:?}"
                )
            }
            other => panic!("expected rate limited, got {other:?}"),
        }
    }

    #[test]
    fn per_device_keys_are_independent() {
        let s = LimitState::new(spec("1/m", 1, LimitKey::Device, None), Arc::default(), 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = key_hash(Some(b"dev-a"), ip, LimitKey::Device);
        let b = key_hash(Some(b"dev-b"), ip, LimitKey::Device);
        let by_ip = key_hash(None, ip, LimitKey::Device);
        assert_ne!(a, b);
        assert!(matches!(s.check(a), LimitOutcome::Admit(_)));
        assert!(matches!(s.check(a), LimitOutcome::RateLimited(_)));
        assert!(matches!(s.check(b), LimitOutcome::Admit(_)));
        assert!(matches!(s.check(by_ip), LimitOutcome::Admit(_)));
        assert_eq!(
            by_ip,
            key_hash(None, ip, LimitKey::Ip),
            "device falls back to the IP"
        );
    }

    #[test]
    fn concurrency_cap_is_released_when_the_permit_drops() {
        let s = LimitState::new(
            LimitSpec {
                rate: None,
                key: LimitKey::Rule,
                max_connections: Some(2),
            },
            Arc::default(),
            10,
        );
        let p1 = s.check(0);
        let _p2 = s.check(0);
        assert!(matches!(s.check(0), LimitOutcome::AtCapacity));
        drop(p1);
        let p3 = s.check(0);
        assert!(matches!(p3, LimitOutcome::Admit(Some(_))));
        assert_eq!(s.open_connections(), 2);
    }

    #[test]
    fn rate_refusal_gives_the_concurrency_slot_back() {
        let s = LimitState::new(spec("1/m", 1, LimitKey::Rule, Some(5)), Arc::default(), 10);
        let _held = s.check(0);
        assert!(matches!(s.check(0), LimitOutcome::RateLimited(_)));
        assert_eq!(s.open_connections(), 1);
    }

    #[test]
    fn a_million_distinct_keys_stay_bounded() {
        let cap = 50_000;
        let s = LimitState::new(
            spec("10/s", 10, LimitKey::Device, None),
            Arc::default(),
            cap,
        );
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for i in 0..1_000_000u32 {
            let k = key_hash(Some(i.to_string().as_bytes()), ip, LimitKey::Device);
            let _ = s.check(k);
        }
        // The table stops growing at the cap (plus the shared overflow key).
        assert!(s.keys() <= cap + 1, "{} keys", s.keys());
    }

    #[test]
    fn store_keeps_state_across_reloads_when_unchanged() {
        let store = LimitStore::new(10);
        let sp = spec("1/m", 1, LimitKey::Rule, Some(3));
        let a = store.get("r", sp);
        let _permit = a.check(0);
        let b = store.get("r", sp);
        assert!(Arc::ptr_eq(&a, &b));
        let changed = store.get("r", spec("2/m", 1, LimitKey::Rule, Some(3)));
        assert!(!Arc::ptr_eq(&a, &changed));
        assert_eq!(
            changed.open_connections(),
            1,
            "open connections survive a rule change"
        );
        // A rule that disappears keeps its state for a grace period (a transient edit).
        store.retain(&HashSet::new());
        store.sweep();
        assert!(Arc::ptr_eq(
            &store.get("r", spec("2/m", 1, LimitKey::Rule, Some(3))),
            &changed
        ));
    }

    #[test]
    fn global_caps() {
        let g = GlobalLimits::new(
            2,
            Some(Rate::parse("2/m").unwrap()),
            Some(Rate::parse("1/m").unwrap()),
            10,
        );
        let a = g.connection();
        let _b = g.connection();
        assert!(g.connection().is_none());
        drop(a);
        assert!(g.connection().is_some());
        assert!(g.handshake_ok() && g.handshake_ok() && !g.handshake_ok());
        let ip1: IpAddr = "192.0.2.1".parse().unwrap();
        let ip2: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(g.per_ip_ok(ip1) && !g.per_ip_ok(ip1) && g.per_ip_ok(ip2));
    }
}
