//! The whole instance's decisions and backend time over the last 15 minutes in 10-second
//! slots: what the console draws as a chart. Fixed size; a slot is reused when its time
//! comes round again.

use super::cohort::{LatencyHistogram, Outcome};
use super::window::Tally;

/// Seconds per slot.
pub const SLOT_SECS: u64 = 10;
/// Slots kept: 15 minutes.
pub const SLOTS: usize = 90;

/// Refusal kinds of a timeline slot, in the order of [`TimelineTally::refused`].
pub const TIMELINE_REFUSALS: [&str; 5] =
    ["deny", "limited", "killswitch", "held_back", "ambiguous"];

/// What the instance did during one slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimelineTally {
    /// Forwarded.
    pub admitted: u32,
    /// Refused, by kind ([`TIMELINE_REFUSALS`]).
    pub refused: [u32; 5],
    /// Backend time to the response head or 101, microseconds.
    pub backend: LatencyHistogram,
    /// Backend failures and timeouts.
    pub backend_errors: u32,
}

impl Tally for TimelineTally {
    fn merge(&mut self, other: &Self) {
        self.admitted = self.admitted.saturating_add(other.admitted);
        for (a, b) in self.refused.iter_mut().zip(other.refused) {
            *a = a.saturating_add(b);
        }
        self.backend.merge(&other.backend);
        self.backend_errors = self.backend_errors.saturating_add(other.backend_errors);
    }
}

/// One slot as reported: its start (seconds on the census clock) and its tally.
pub type TimelineSlot = (u64, TimelineTally);

/// The last [`SLOTS`] slots.
pub(super) struct Timeline {
    slots: [(u64, TimelineTally); SLOTS],
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            slots: [(0, TimelineTally::default()); SLOTS],
        }
    }
}

impl Timeline {
    pub(super) fn slot(&mut self, now_secs: u64) -> &mut TimelineTally {
        let stamp = now_secs / SLOT_SECS;
        let slot = &mut self.slots[(stamp % SLOTS as u64) as usize];
        if slot.0 != stamp {
            *slot = (stamp, TimelineTally::default());
        }
        &mut slot.1
    }

    pub(super) fn count(&mut self, now_secs: u64, outcome: Outcome) {
        let slot = self.slot(now_secs);
        let counter = match outcome {
            Outcome::Admitted => &mut slot.admitted,
            Outcome::Denied => &mut slot.refused[0],
            Outcome::Limited => &mut slot.refused[1],
            Outcome::KillSwitch => &mut slot.refused[2],
            Outcome::HeldBack => &mut slot.refused[3],
        };
        *counter = counter.saturating_add(1);
    }

    /// Every slot of the last 15 minutes, oldest first, ending with the current one (slots
    /// with nothing recorded are zero).
    pub(super) fn report(&self, now_secs: u64) -> Vec<TimelineSlot> {
        let current = now_secs / SLOT_SECS;
        (0..SLOTS as u64)
            .rev()
            .map(|back| {
                let stamp = current.saturating_sub(back);
                let slot = &self.slots[(stamp % SLOTS as u64) as usize];
                let tally = if slot.0 == stamp {
                    slot.1
                } else {
                    TimelineTally::default()
                };
                (stamp * SLOT_SECS, tally)
            })
            .collect()
    }
}
