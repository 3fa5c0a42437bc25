//! The recent audit trail: every kill-switch change and rules reload, kept in memory (the
//! last [`MAX_EVENTS`]) for `GET /v1/audit` and the console. Each event is also written as a
//! `fwgate::audit` log line, which is the durable record.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Events kept in memory.
pub const MAX_EVENTS: usize = 200;

/// One change, as operators read it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// Unix seconds.
    pub time: u64,
    /// `kill_add`, `kill_remove`, `kill_file`, `kill_fleet` (the fleet's entries applied),
    /// `rules_applied`, `rules_error`.
    pub action: &'static str,
    /// Kill-switch entry id, when it is about one.
    pub id: Option<String>,
    /// Its range.
    pub versions: Option<String>,
    /// Why, as the operator said.
    pub reason: Option<String>,
    /// Who, as the CLI or console said.
    pub by: Option<String>,
    /// Anything else worth a line (generation, error, entries on disk).
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A kill-switch entry added (or replaced), with `detail` (expiry, scope).
    pub fn added(spec: &crate::killswitch::EntrySpec, detail: Option<String>) -> AuditEvent {
        AuditEvent {
            action: "kill_add",
            id: Some(spec.id.clone()),
            versions: Some(spec.versions.clone()),
            reason: Some(spec.reason.clone()),
            by: spec.created_by.clone(),
            detail,
            ..AuditEvent::default()
        }
    }
}

/// The last [`MAX_EVENTS`] events, newest last.
#[derive(Default)]
pub struct AuditTrail {
    events: Mutex<VecDeque<AuditEvent>>,
}

impl AuditTrail {
    /// Records one event (stamped now), dropping the oldest beyond [`MAX_EVENTS`].
    pub fn record(&self, mut event: AuditEvent) {
        event.time = crate::killswitch::unix_now();
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// The events, newest first.
    pub fn recent(&self) -> Vec<AuditEvent> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_events_newest_first() {
        let trail = AuditTrail::default();
        for i in 0..MAX_EVENTS + 5 {
            trail.record(AuditEvent {
                action: "kill_add",
                id: Some(format!("e{i}")),
                ..AuditEvent::default()
            });
        }
        let recent = trail.recent();
        assert_eq!(recent.len(), MAX_EVENTS);
        assert_eq!(recent[0].id.as_deref(), Some("e204"));
        assert_eq!(recent[MAX_EVENTS - 1].id.as_deref(), Some("e5"));
        assert!(recent[0].time > 0);
    }
}
