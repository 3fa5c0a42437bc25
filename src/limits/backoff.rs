//! Reconnect backoff: the feedback loop of the 2020-02-08 outage was devices reconnecting at
//! once after every failure. A device that is refused, or whose tunnels end soon after they
//! open, more than `threshold` times within `window` gets a penalty that doubles with each
//! repeat (from `base` up to `max`); until it ends, its handshakes are refused without backend
//! contact and told exactly when to come back. After `quiet` without events, it starts over.
//!
//! **Who is a device** ([`BackoffKey`]). By default, a device id *together with* the client
//! address: many devices behind one address (an office NAT, a load balancer without PROXY
//! protocol) are never held back for each other, and an id sent from another address is
//! another key, so nobody can get a device held back by spoofing its id from elsewhere.
//! Requests without a device id are not held back at all. Keying by address alone is opt-in
//! (`key = "ip"`), for fleets where one address is one device.
//!
//! **What counts** is storm-shaped only: refusals, and tunnels that ended within
//! `short_tunnel` of opening on their own (either side closed or failed). A long-lived tunnel
//! ending is health, and closes fwgate causes (policy, kill switch, drain, shutdown, idle
//! timeout) never count.
//!
//! State is 24 bytes of counters per key (plus the map's overhead), in 16 independently locked
//! shards so two cores rarely contend; at most `max_keys` keys are kept, quiet ones are swept.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// What identifies one device to the backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackoffKey {
    /// The device id together with the client address; no device id, no backoff.
    #[default]
    Device,
    /// The client address alone (every device behind a NAT shares one key).
    Ip,
}

impl BackoffKey {
    /// The name in `fwgate.toml`, logs and the `key` label.
    pub fn as_str(self) -> &'static str {
        match self {
            BackoffKey::Device => "device",
            BackoffKey::Ip => "ip",
        }
    }
}

/// How long a tunnel must have lived for its end to count as health rather than churn,
/// unless `short_tunnel` says otherwise.
pub const DEFAULT_SHORT_TUNNEL: Duration = Duration::from_secs(10);
/// At most one WARN per this period says that devices are being held back.
const WARN_EVERY_MS: u64 = 10_000;

/// Reconnect backoff settings (`[limits.backoff]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Off switch.
    pub enabled: bool,
    /// Refusals/disconnects tolerated per window before a penalty starts.
    pub threshold: u32,
    /// Counting window.
    pub window: Duration,
    /// First penalty.
    pub base: Duration,
    /// Longest penalty.
    pub max: Duration,
    /// Quiet period after which a key starts over.
    pub quiet: Duration,
    /// Keys kept at most.
    pub max_keys: usize,
    /// What identifies a device.
    pub key: BackoffKey,
    /// A tunnel that ends on its own sooner than this after opening counts as a storm event.
    pub short_tunnel: Duration,
}

impl Default for BackoffConfig {
    /// Conservative: only a device reconnecting more than 10 times a minute is slowed, first for
    /// 5 s, at most 5 min, forgiven after 5 quiet minutes.
    fn default() -> Self {
        BackoffConfig {
            enabled: true,
            threshold: 10,
            window: Duration::from_secs(60),
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
            quiet: Duration::from_secs(300),
            max_keys: super::DEFAULT_MAX_KEYS,
            key: BackoffKey::Device,
            short_tunnel: DEFAULT_SHORT_TUNNEL,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    window_start: u64,
    last_event: u64,
    penalty_until: u64,
    count: u32,
    level: u8,
}

const SHARDS: usize = 16;

/// Per-key reconnect accounting.
#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
    /// Refusals by the backoff since the last WARN about them.
    held_since_warn: AtomicU64,
    /// When that WARN was written (ms on the process clock, 0: never).
    last_warn_ms: AtomicU64,
}

fn now_ms() -> u64 {
    crate::clock::since_start().as_millis() as u64
}

impl Backoff {
    /// Creates the tracker.
    pub fn new(config: BackoffConfig) -> Backoff {
        Backoff {
            config,
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            held_since_warn: AtomicU64::new(0),
            last_warn_ms: AtomicU64::new(0),
        }
    }

    /// The key of a request from `ip` with `device` (raw id bytes), or None when this request
    /// is not tracked (backoff off, or no device id with the default key).
    pub fn key(&self, device: Option<&[u8]>, ip: IpAddr) -> Option<u64> {
        if !self.config.enabled {
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match self.config.key {
            BackoffKey::Device => {
                0u8.hash(&mut h);
                device?.hash(&mut h);
            }
            BackoffKey::Ip => 1u8.hash(&mut h),
        }
        ip.hash(&mut h);
        Some(h.finish())
    }

    /// Whether a tunnel that lived `lifetime` and ended on its own counts as a storm event.
    pub fn is_short(&self, lifetime: Duration) -> bool {
        lifetime < self.config.short_tunnel
    }

    /// Notes one request held back; returns how many were held back since the last call that
    /// returned something, at most once per 10 s, so the caller can WARN about it.
    pub fn note_held_back(&self) -> Option<u64> {
        self.note_held_back_at(now_ms())
    }

    fn note_held_back_at(&self, now: u64) -> Option<u64> {
        self.held_since_warn.fetch_add(1, Ordering::Relaxed);
        let now = now.max(1);
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < WARN_EVERY_MS {
            return None;
        }
        self.last_warn_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.held_since_warn.swap(0, Ordering::Relaxed))
    }

    /// The settings.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.shards[(key as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Remaining penalty for `key`, if it is being held back.
    pub fn penalty(&self, key: u64) -> Option<Duration> {
        self.penalty_at(key, now_ms)
    }

    /// `now` is read only when the key has an entry: most admissions have none and then
    /// cost no clock reading.
    fn penalty_at(&self, key: u64, now: impl FnOnce() -> u64) -> Option<Duration> {
        if !self.config.enabled {
            return None;
        }
        let shard = self.shard(key);
        let until = shard.get(&key)?.penalty_until;
        let now = now();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Records a refusal or a disconnect of `key`; returns the penalty it starts, if any.
    pub fn record(&self, key: u64) -> Option<Duration> {
        self.record_at(key, now_ms())
    }

    fn record_at(&self, key: u64, now: u64) -> Option<Duration> {
        if !self.config.enabled {
            return None;
        }
        let c = &self.config;
        let per_shard_cap = c.max_keys.div_ceil(SHARDS).max(1);
        let mut shard = self.shard(key);
        if !shard.contains_key(&key) && shard.len() >= per_shard_cap {
            // Full: this key is not tracked until a sweep makes room (bounded memory wins).
            return None;
        }
        let e = shard.entry(key).or_insert(Entry {
            window_start: now,
            last_event: now,
            ..Entry::default()
        });
        if now.saturating_sub(e.last_event) > c.quiet.as_millis() as u64 {
            *e = Entry {
                window_start: now,
                ..Entry::default()
            };
        }
        e.last_event = now;
        if e.penalty_until > now {
            // Already held back: do not escalate on the refusals the penalty itself causes.
            return None;
        }
        if now.saturating_sub(e.window_start) > c.window.as_millis() as u64 {
            e.window_start = now;
            e.count = 0;
        }
        e.count = e.count.saturating_add(1);
        if e.count <= c.threshold {
            return None;
        }
        e.level = e.level.saturating_add(1).min(32);
        let penalty = c
            .base
            .saturating_mul(1u32 << (e.level - 1).min(31))
            .min(c.max);
        e.penalty_until = now + penalty.as_millis() as u64;
        e.count = 0;
        e.window_start = now;
        Some(penalty)
    }

    /// Forgets keys quiet for longer than `quiet`; returns (keys kept, keys under penalty).
    pub fn sweep(&self) -> (usize, usize) {
        let now = now_ms();
        let quiet = self.config.quiet.as_millis() as u64;
        let mut kept = 0;
        let mut penalized = 0;
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(|e| e.into_inner());
            s.retain(|_, e| e.penalty_until > now || now.saturating_sub(e.last_event) <= quiet);
            s.shrink_to_fit();
            kept += s.len();
            penalized += s.values().filter(|e| e.penalty_until > now).count();
        }
        (kept, penalized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BackoffConfig {
        BackoffConfig {
            threshold: 3,
            window: Duration::from_secs(10),
            base: Duration::from_secs(2),
            max: Duration::from_secs(7),
            quiet: Duration::from_secs(60),
            ..BackoffConfig::default()
        }
    }

    #[test]
    fn penalty_starts_after_the_threshold_and_doubles_up_to_the_cap() {
        let b = Backoff::new(cfg());
        let mut t = 1_000;
        for _ in 0..3 {
            assert_eq!(b.record_at(7, t), None);
            t += 10;
        }
        assert_eq!(b.record_at(7, t), Some(Duration::from_secs(2)));
        assert!(b.penalty_at(7, || t + 1).is_some());
        assert_eq!(
            b.penalty_at(8, || t + 1),
            None,
            "other keys are not affected"
        );
        // Refusals during the penalty do not escalate it.
        assert_eq!(b.record_at(7, t + 5), None);
        let mut penalties = Vec::new();
        for _ in 0..3 {
            t += 8_000; // after the penalty
            for _ in 0..4 {
                if let Some(p) = b.record_at(7, t) {
                    penalties.push(p);
                }
                t += 1;
            }
        }
        assert_eq!(
            penalties,
            vec![
                Duration::from_secs(4),
                Duration::from_secs(7),
                Duration::from_secs(7)
            ]
        );
    }

    #[test]
    fn slow_reconnects_never_trigger_and_quiet_resets() {
        let b = Backoff::new(cfg());
        let mut t = 0;
        for _ in 0..100 {
            assert_eq!(
                b.record_at(1, t),
                None,
                "one event every 4 s stays under 3 per 10 s"
            );
            t += 4_000;
        }
        for _ in 0..4 {
            b.record_at(2, t);
        }
        assert!(b.penalty_at(2, || t).is_some());
        t += 120_000;
        for _ in 0..3 {
            assert_eq!(b.record_at(2, t), None);
        }
        assert_eq!(
            b.record_at(2, t),
            Some(Duration::from_secs(2)),
            "level starts over after quiet"
        );
    }

    #[test]
    fn a_device_is_its_id_together_with_its_address_and_no_id_is_not_tracked() {
        let b = Backoff::new(cfg());
        let (home, elsewhere) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let key = b.key(Some(b"dev-1"), home).unwrap();
        assert_eq!(b.key(Some(b"dev-1"), home), Some(key));
        assert_ne!(
            b.key(Some(b"dev-1"), elsewhere),
            Some(key),
            "same id elsewhere"
        );
        assert_ne!(
            b.key(Some(b"dev-2"), home),
            Some(key),
            "another device, same address"
        );
        assert_eq!(b.key(None, home), None, "no id: never held back");

        let by_ip = Backoff::new(BackoffConfig {
            key: BackoffKey::Ip,
            ..cfg()
        });
        assert_eq!(by_ip.key(Some(b"a"), home), by_ip.key(Some(b"b"), home));
        assert_eq!(by_ip.key(None, home), by_ip.key(Some(b"a"), home));
        assert_ne!(by_ip.key(None, home), by_ip.key(None, elsewhere));
        let off = Backoff::new(BackoffConfig {
            enabled: false,
            ..cfg()
        });
        assert_eq!(off.key(Some(b"dev-1"), home), None);
    }

    #[test]
    fn holding_back_is_reported_at_most_once_per_period_with_the_count() {
        let b = Backoff::new(cfg());
        assert_eq!(b.note_held_back_at(500), Some(1));
        for t in 0..5 {
            assert_eq!(b.note_held_back_at(600 + t), None);
        }
        assert_eq!(b.note_held_back_at(500 + WARN_EVERY_MS - 1), None);
        assert_eq!(b.note_held_back_at(500 + WARN_EVERY_MS), Some(7));
        assert_eq!(b.note_held_back_at(600 + WARN_EVERY_MS), None);
    }

    #[test]
    fn disabled_does_nothing_and_memory_is_capped() {
        let off = Backoff::new(BackoffConfig {
            enabled: false,
            ..cfg()
        });
        for _ in 0..10 {
            assert_eq!(off.record_at(1, 0), None);
        }
        let capped = Backoff::new(BackoffConfig {
            max_keys: 160,
            ..cfg()
        });
        for k in 0..100_000u64 {
            capped.record_at(k, 0);
        }
        assert!(capped.sweep().0 <= 160);
    }
}
