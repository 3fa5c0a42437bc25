//! What the census counts per firmware version and per slot of time: decisions, the
//! backend's answers (time to the response head or 101, errors, timeouts) and how tunnels
//! ended (lifetime, churn). Everything is a fixed-size tally, added up over a window when a
//! report asks; nothing is computed per request.

use super::histogram::Histogram;
use super::window::Tally;

/// Backend time in microseconds: below 128 µs, then doubling up to about 134 s.
pub type LatencyHistogram = Histogram<22, 128>;
/// Tunnel lifetime in milliseconds: below 250 ms, then doubling up to about 4.5 hours.
pub type LifetimeHistogram = Histogram<18, 250>;

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

/// How the backend answered an admitted handshake or request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendResult {
    /// A response head (or 101) arrived.
    Answered,
    /// Unreachable, refused or broken (502).
    Error,
    /// Connect or response timeout (504).
    Timeout,
}

/// What one cohort did during a slot of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CohortTally {
    /// Handshakes and requests decided.
    pub handshakes: u32,
    /// Of those, forwarded.
    pub admitted: u32,
    /// Of those, refused, by reason ([`REFUSAL_REASONS`]).
    pub refused: [u32; 4],
    /// Time from admission to the backend's response head (or 101), for those answered.
    pub backend: LatencyHistogram,
    /// Backend failures (502).
    pub backend_errors: u32,
    /// Backend timeouts (504).
    pub backend_timeouts: u32,
    /// Tunnels that ended (any cause).
    pub tunnels_ended: u32,
    /// Of those, ended on their own soon after opening (the backoff's `short_tunnel`): churn.
    pub short_tunnels: u32,
    /// How long tunnels lived.
    pub lifetime: LifetimeHistogram,
}

impl CohortTally {
    /// Held back by the reconnect backoff.
    pub fn held_back(&self) -> u32 {
        self.refused[3]
    }

    pub(super) fn count(&mut self, outcome: Outcome) {
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

    pub(super) fn count_backend(&mut self, micros: u64, result: BackendResult) {
        match result {
            BackendResult::Answered => self.backend.record(micros),
            BackendResult::Error => self.backend_errors = self.backend_errors.saturating_add(1),
            BackendResult::Timeout => {
                self.backend_timeouts = self.backend_timeouts.saturating_add(1)
            }
        }
    }

    pub(super) fn count_tunnel_end(&mut self, millis: u64, short: bool) {
        self.tunnels_ended = self.tunnels_ended.saturating_add(1);
        if short {
            self.short_tunnels = self.short_tunnels.saturating_add(1);
        }
        self.lifetime.record(millis);
    }

    /// Backend answers plus failures: what an error rate is out of.
    pub fn backend_attempts(&self) -> u64 {
        self.backend.count() + u64::from(self.backend_errors) + u64::from(self.backend_timeouts)
    }
}

impl Tally for CohortTally {
    fn merge(&mut self, other: &Self) {
        let add = |a: &mut u32, b: u32| *a = a.saturating_add(b);
        add(&mut self.handshakes, other.handshakes);
        add(&mut self.admitted, other.admitted);
        for (a, b) in self.refused.iter_mut().zip(other.refused) {
            add(a, b);
        }
        self.backend.merge(&other.backend);
        add(&mut self.backend_errors, other.backend_errors);
        add(&mut self.backend_timeouts, other.backend_timeouts);
        add(&mut self.tunnels_ended, other.tunnels_ended);
        add(&mut self.short_tunnels, other.short_tunnels);
        self.lifetime.merge(&other.lifetime);
    }
}

/// One version's figures over the last minute and the last hour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CohortFigures {
    /// The last minute.
    pub minute: CohortTally,
    /// The last hour.
    pub hour: CohortTally,
}
