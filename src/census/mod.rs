//! The fleet census behind `GET /v1/versions` and the console: which firmware versions are
//! connecting, what fwgate did with them (admitted, or refused and why), how the backend
//! answered them (time to the response head or 101, errors, timeouts) and how their tunnels
//! ended (lifetime, churn), over the last minute and hour; and the whole instance over the
//! last 15 minutes ([`Census::timeline`]). Operators read it to find the cohort that hurts the
//! backend before they block something, so junk must not be able to blind it.
//!
//! Versions are counted in a bounded [`table::SpaceSaving`] table of [`TRACKED_VERSIONS`]
//! cohorts: a flood of distinct junk versions only ever replaces other junk, and a version
//! with real traffic keeps its row. A cohort that leaves the table is folded into `other`,
//! so every handshake is still counted somewhere. The census records data only; the report
//! (with today's decision per version) is built by the admin API.

pub mod cohort;
pub mod histogram;
pub mod suspects;
pub mod table;
pub mod timeline;
pub mod window;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::rules::VersionInput;
pub use cohort::{BackendResult, CohortFigures, CohortTally, Outcome, REFUSAL_REASONS};
use table::SpaceSaving;
use timeline::Timeline;
pub use timeline::{TimelineSlot, TimelineTally, TIMELINE_REFUSALS};
use window::{Tally, Window};

/// Distinct versions counted individually (about 5 KB each).
pub const TRACKED_VERSIONS: usize = 512;

/// Everything the census holds at one moment, for the report.
#[derive(Clone, Debug, Default)]
pub struct CensusSnapshot {
    /// Versions counted individually, in no particular order.
    pub cohorts: Vec<(VersionInput, CohortFigures)>,
    /// Everything else: versions that left the table.
    pub other: CohortFigures,
    /// The whole instance (every cohort and `other`).
    pub all: CohortFigures,
}

struct Cohorts {
    table: SpaceSaving<VersionInput, Box<Window<CohortTally>>>,
    other: Window<CohortTally>,
    timeline: Timeline,
}

impl Cohorts {
    /// The window of `version`, or `other` when it is not (or no longer) in the table. Does
    /// not count as an occurrence: only decisions decide who stays in the table.
    fn window(&mut self, version: &VersionInput) -> &mut Window<CohortTally> {
        match self.table.get_mut(version) {
            Some(w) => w,
            None => &mut self.other,
        }
    }
}

/// Handshake outcomes, backend answers and tunnel ends per version.
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
                timeline: Timeline::default(),
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
        let Cohorts {
            table,
            other,
            timeline,
        } = &mut *guard;
        let window = table.touch(*version, minute, |_, gone| other.absorb(&gone, now));
        window.record(now, |t| t.count(outcome));
        timeline.count(now, outcome);
    }

    /// Counts a request refused as ambiguous (no version to count it under).
    pub fn record_ambiguous(&self) {
        let now = window::now_secs();
        let mut guard = self.lock();
        let ambiguous = &mut guard.timeline.slot(now).refused[4];
        *ambiguous = ambiguous.saturating_add(1);
    }

    /// Counts the backend's answer to an admitted handshake or request of `version`, `took`
    /// after admission.
    pub fn record_backend(&self, version: &VersionInput, took: Duration, result: BackendResult) {
        let now = window::now_secs();
        let micros = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut guard = self.lock();
        guard
            .window(version)
            .record(now, |t| t.count_backend(micros, result));
        let slot = guard.timeline.slot(now);
        match result {
            BackendResult::Answered => slot.backend.record(micros),
            _ => slot.backend_errors = slot.backend_errors.saturating_add(1),
        }
    }

    /// Counts the end of a tunnel of `version` that lived `lifetime`; `short` when it ended on
    /// its own soon after opening (churn).
    pub fn record_tunnel_end(&self, version: &VersionInput, lifetime: Duration, short: bool) {
        let now = window::now_secs();
        let millis = lifetime.as_millis().min(u128::from(u64::MAX)) as u64;
        self.lock()
            .window(version)
            .record(now, |t| t.count_tunnel_end(millis, short));
    }

    /// The figures of every version held, of `other`, and of the whole instance.
    pub fn snapshot(&self) -> CensusSnapshot {
        let now = window::now_secs();
        let guard = self.lock();
        let figures = |w: &Window<CohortTally>| CohortFigures {
            minute: w.last_minute(now),
            hour: w.last_hour(now),
        };
        let cohorts: Vec<_> = guard
            .table
            .iter()
            .map(|(version, window)| (*version, figures(window)))
            .collect();
        let other = figures(&guard.other);
        let mut all = other;
        for (_, f) in &cohorts {
            all.minute.merge(&f.minute);
            all.hour.merge(&f.hour);
        }
        CensusSnapshot {
            cohorts,
            other,
            all,
        }
    }

    /// The last 15 minutes of the whole instance, oldest slot first; each slot's start is
    /// given in unix seconds.
    pub fn timeline(&self) -> Vec<TimelineSlot> {
        let now = window::now_secs();
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let offset = unix_now.saturating_sub(now);
        self.lock()
            .timeline
            .report(now)
            .into_iter()
            .map(|(t, tally)| (t + offset, tally))
            .collect()
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
        let other = snap.other.hour.handshakes;
        assert_eq!(listed + other, 1_551, "every handshake is counted once");
        assert_eq!(snap.other.hour.refused[0], other);
    }
}
