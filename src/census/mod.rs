//! The fleet census behind `GET /v1/versions`: which firmware versions are connecting, and
//! what fwgate did with them (admitted, or refused and why) over the last minute and hour.
//! Operators read it before they block something, so junk must not be able to blind it.
//!
//! Versions are counted in a bounded [`table::SpaceSaving`] table of [`TRACKED_VERSIONS`]
//! cohorts: a flood of distinct junk versions only ever replaces other junk, and a version
//! with real traffic keeps its row. A cohort that leaves the table is folded into `other`,
//! so every handshake is still counted somewhere. The census records data only; the report
//! (with today's decision per version) is built by the admin API.

pub mod table;
pub mod window;

use std::sync::{Mutex, MutexGuard};

use crate::rules::VersionInput;
use table::SpaceSaving;
use window::{Tally, Window};

/// Distinct versions counted individually (about 2.5 KB each).
pub const TRACKED_VERSIONS: usize = 512;

/// What fwgate did with one handshake or request, as the census counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to the backend.
    Admitted,
    /// Refused by a `deny` rule or default.
    Denied,
    /// Refused by a limit: a `limit` rule, or a process-wide cap.
    Limited,
    /// Refused by a kill-switch entry.
    KillSwitch,
    /// Held back by the reconnect backoff.
    HeldBack,
}

/// Refusal reasons in the order of [`CohortTally::refused`].
pub const REFUSAL_REASONS: [&str; 4] = ["deny", "limited", "killswitch", "held_back"];

/// What one cohort did during a slot of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CohortTally {
    /// Handshakes and requests decided.
    pub handshakes: u32,
    /// Of those, forwarded.
    pub admitted: u32,
    /// Of those, refused, by reason ([`REFUSAL_REASONS`]).
    pub refused: [u32; 4],
}

impl CohortTally {
    /// Held back by the reconnect backoff.
    pub fn held_back(&self) -> u32 {
        self.refused[3]
    }

    fn count(&mut self, outcome: Outcome) {
        self.handshakes = self.handshakes.saturating_add(1);
        let counter = match outcome {
            Outcome::Admitted => &mut self.admitted,
            Outcome::Denied => &mut self.refused[0],
            Outcome::Limited => &mut self.refused[1],
            Outcome::KillSwitch => &mut self.refused[2],
            Outcome::HeldBack => &mut self.refused[3],
        };
        *counter = counter.saturating_add(1);
    }
}

impl Tally for CohortTally {
    fn merge(&mut self, other: &Self) {
        self.handshakes = self.handshakes.saturating_add(other.handshakes);
        self.admitted = self.admitted.saturating_add(other.admitted);
        for (a, b) in self.refused.iter_mut().zip(other.refused) {
            *a = a.saturating_add(b);
        }
    }
}

/// One version's figures over the last minute and the last hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CohortFigures {
    /// The last minute.
    pub minute: CohortTally,
    /// The last hour.
    pub hour: CohortTally,
}

/// Everything the census holds at one moment, for the report.
#[derive(Clone, Debug, Default)]
pub struct CensusSnapshot {
    /// Versions counted individually, in no particular order.
    pub cohorts: Vec<(VersionInput, CohortFigures)>,
    /// Everything else: versions that left the table.
    pub other: Option<CohortFigures>,
}

struct Cohorts {
    table: SpaceSaving<VersionInput, Box<Window<CohortTally>>>,
    other: Window<CohortTally>,
}

/// Handshake outcomes per version.
pub struct Census {
    cohorts: Mutex<Cohorts>,
}

impl Default for Census {
    fn default() -> Self {
        Census::with_capacity(TRACKED_VERSIONS)
    }
}

impl Census {
    /// A census tracking at most `capacity` versions individually.
    pub fn with_capacity(capacity: usize) -> Census {
        Census {
            cohorts: Mutex::new(Cohorts {
                table: SpaceSaving::new(capacity),
                other: Window::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Cohorts> {
        self.cohorts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one decided handshake or request of `version`.
    pub fn record(&self, version: &VersionInput, outcome: Outcome) {
        let now = window::now_secs();
        let minute = (now / 60) as u32;
        let mut guard = self.lock();
        let Cohorts { table, other } = &mut *guard;
        let window = table.touch(*version, minute, |_, gone| other.absorb(&gone, now));
        window.record(now, |t| t.count(outcome));
    }

    /// The figures of every version held, and of `other`.
    pub fn snapshot(&self) -> CensusSnapshot {
        let now = window::now_secs();
        let guard = self.lock();
        let figures = |w: &Window<CohortTally>| CohortFigures {
            minute: w.last_minute(now),
            hour: w.last_hour(now),
        };
        CensusSnapshot {
            cohorts: guard
                .table
                .iter()
                .map(|(version, window)| (*version, figures(window)))
                .collect(),
            other: Some(figures(&guard.other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::FirmwareVersion;

    fn version(text: &str) -> VersionInput {
        VersionInput::Parsed(FirmwareVersion::parse(text).unwrap())
    }

    #[test]
    fn junk_cannot_blind_the_census_and_is_still_counted() {
        let census = Census::with_capacity(64);
        for i in 0..1_500u64 {
            census.record(&version(&format!("9.{i}.0")), Outcome::Denied);
        }
        let real = version("3.7.2");
        for _ in 0..50 {
            census.record(&real, Outcome::Admitted);
        }
        census.record(&real, Outcome::HeldBack);
        let snap = census.snapshot();
        assert!(snap.cohorts.len() <= 64);
        let (_, figures) = snap
            .cohorts
            .iter()
            .find(|(v, _)| *v == real)
            .expect("the real version is listed");
        assert_eq!(figures.hour.handshakes, 51);
        assert_eq!(figures.minute.admitted, 50);
        assert_eq!(figures.minute.held_back(), 1);
        let listed: u32 = snap.cohorts.iter().map(|(_, f)| f.hour.handshakes).sum();
        let other = snap.other.map_or(0, |o| o.hour.handshakes);
        assert_eq!(listed + other, 1_551, "every handshake is counted once");
        assert_eq!(snap.other.map_or(0, |o| o.hour.refused[0]), other);
    }
}
