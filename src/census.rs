//! The fleet census behind `GET /v1/versions`: which firmware versions are connecting and
//! connected right now, and what each one is decided today. Operators read it before they
//! block something. Memory is bounded: at most [`MAX_TRACKED_VERSIONS`] distinct versions are
//! counted individually; later newcomers are folded into `other`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};

use crate::gate::Gate;
use crate::rules::VersionInput;

/// Distinct versions counted individually (a few hundred bytes each).
pub const MAX_TRACKED_VERSIONS: usize = 1000;
/// Versions listed in a report; the rest are summed into `other`.
pub const REPORTED_VERSIONS: usize = 100;

const SLOT_SECS: u64 = 5;
const MINUTE_SLOTS: usize = 12;
const HOUR_SLOTS: usize = 60;

/// Handshake counts over sliding windows: 12 five-second slots and 60 one-minute slots.
#[derive(Clone)]
struct Window {
    fine: [(u64, u32); MINUTE_SLOTS],
    coarse: [(u64, u32); HOUR_SLOTS],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            fine: [(0, 0); MINUTE_SLOTS],
            coarse: [(0, 0); HOUR_SLOTS],
        }
    }
}

impl Window {
    fn record(&mut self, now_secs: u64) {
        bump(&mut self.fine, now_secs / SLOT_SECS);
        bump(&mut self.coarse, now_secs / 60);
    }

    fn last_minute(&self, now_secs: u64) -> u64 {
        sum(&self.fine, now_secs / SLOT_SECS)
    }

    fn last_hour(&self, now_secs: u64) -> u64 {
        sum(&self.coarse, now_secs / 60)
    }
}

fn bump<const N: usize>(slots: &mut [(u64, u32); N], stamp: u64) {
    let slot = &mut slots[(stamp % N as u64) as usize];
    if slot.0 != stamp {
        *slot = (stamp, 0);
    }
    slot.1 = slot.1.saturating_add(1);
}

fn sum<const N: usize>(slots: &[(u64, u32); N], current: u64) -> u64 {
    slots
        .iter()
        .filter(|(stamp, _)| *stamp + N as u64 > current && *stamp <= current)
        .map(|(_, n)| u64::from(*n))
        .sum()
}

fn now_secs() -> u64 {
    // Offset by one window so that stamp 0 never collides with "never written".
    crate::clock::since_start().as_secs() + 3600
}

/// Handshake counts per version.
#[derive(Default)]
pub struct Census {
    counts: Mutex<HashMap<VersionInput, Window>>,
    other: Mutex<Window>,
}

impl Census {
    fn counts(&self) -> MutexGuard<'_, HashMap<VersionInput, Window>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one handshake (admitted or refused) of `version`.
    pub fn record(&self, version: &VersionInput) {
        let now = now_secs();
        let mut counts = self.counts();
        if let Some(w) = counts.get_mut(version) {
            w.record(now);
        } else if counts.len() < MAX_TRACKED_VERSIONS {
            counts.entry(*version).or_default().record(now);
        } else {
            drop(counts);
            self.other
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(now);
        }
    }

    /// The census as JSON: top versions by activity, each with active connections, recent
    /// handshakes and today's decision under the rules in force.
    pub fn report(&self, gate: &Gate) -> Value {
        let now = now_secs();
        let mut rows: HashMap<VersionInput, (u64, u64, u64)> = HashMap::new();
        for (v, w) in self.counts().iter() {
            rows.insert(*v, (0, w.last_minute(now), w.last_hour(now)));
        }
        gate.registry.for_each(|t| {
            rows.entry(t.version).or_default().0 += 1;
        });
        let mut rows: Vec<_> = rows.into_iter().collect();
        rows.sort_by_key(|(_, (active, minute, hour))| {
            std::cmp::Reverse((*active, *hour, *minute))
        });
        let snap = gate.snapshot();
        let mut other = {
            let w = self.other.lock().unwrap_or_else(|e| e.into_inner());
            (0u64, w.last_minute(now), w.last_hour(now))
        };
        let mut listed = Vec::new();
        for (i, (version, (active, minute, hour))) in rows.into_iter().enumerate() {
            if i >= REPORTED_VERSIONS {
                other.0 += active;
                other.1 += minute;
                other.2 += hour;
                continue;
            }
            let d = gate.decide(&snap, &version, "/");
            listed.push(json!({
                "version": label(&version),
                "active_connections": active,
                "handshakes_last_minute": minute,
                "handshakes_last_hour": hour,
                "decision": d.decider.action.as_str(),
                "rule": &*d.decider.name,
            }));
        }
        json!({
            "versions": listed,
            "other": {"active_connections": other.0, "handshakes_last_minute": other.1, "handshakes_last_hour": other.2},
            "note": "decision is for path \"/\"; rules with path_prefix may decide other paths differently",
        })
    }
}

fn label(v: &VersionInput) -> String {
    match v {
        VersionInput::Parsed(v) => v.to_string(),
        VersionInput::Missing => "(missing)".into(),
        VersionInput::Unparseable => "(unparseable)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_slide() {
        let mut w = Window::default();
        let t0 = 10_000;
        w.record(t0);
        w.record(t0 + 1);
        assert_eq!(w.last_minute(t0 + 1), 2);
        assert_eq!(w.last_minute(t0 + 70), 0);
        assert_eq!(w.last_hour(t0 + 70), 2);
        assert_eq!(w.last_hour(t0 + 3700), 0);
    }
}
