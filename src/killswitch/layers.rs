//! The entries in force are composed from layers: a system entry (refuse everything while a
//! fleet member has not learnt the fleet's state), the fleet's shared entries, and this
//! instance's local entries. Each layer changes on its own (a store update, an API call, an
//! edit of `killswitch.json`); every change recomposes the whole [`KillSet`] and swaps it in,
//! so the per-request decision still reads one immutable list.

use std::sync::Arc;

use super::{compile_entry, EntrySpec, KillSet, KillSwitchError, Scope};
use crate::metrics::Metrics;
use crate::version::VersionOrdering;

/// Id of the system entry in force while a fleet member has neither synced with the store nor
/// a last-known-good copy (listed as `killswitch:fleet-unsynced`).
pub const UNSYNCED_ID: &str = "fleet-unsynced";
/// Base Retry-After of that refusal: a fresh instance usually syncs within a second.
pub const UNSYNCED_RETRY_AFTER: &str = "10s";

/// The fleet's contribution.
#[derive(Debug, Clone)]
pub enum SharedLayer {
    /// Not in fleet mode: only local entries.
    Off,
    /// Fleet mode, and the fleet's state is not known yet: refuse every device.
    Unsynced,
    /// The fleet's entries as last applied (already compiled and scoped).
    Synced(Vec<super::Entry>),
}

/// Local entries plus the fleet's.
#[derive(Debug)]
pub struct Layers {
    /// This instance's entries (from `state_dir/killswitch.json`).
    pub local: Arc<KillSet>,
    /// The fleet's entries.
    pub shared: SharedLayer,
}

impl Layers {
    /// The set in force: the system entry (when unsynced), then fleet entries, then local ones.
    /// First match decides, so the order only chooses which refusal a device sees.
    pub fn compose(&self, ordering: VersionOrdering, metrics: &Metrics) -> KillSet {
        let mut entries = Vec::new();
        match &self.shared {
            SharedLayer::Off => {}
            SharedLayer::Unsynced => entries.extend(unsynced_entry(ordering, metrics)),
            SharedLayer::Synced(shared) => entries.extend(shared.iter().cloned()),
        }
        entries.extend(self.local.entries.iter().cloned());
        KillSet { entries }
    }

    /// Whether the fleet's state is unknown (the instance refuses everything and is not ready).
    pub fn unsynced(&self) -> bool {
        matches!(self.shared, SharedLayer::Unsynced)
    }
}

/// The refusal in force until the fleet's state is known.
fn unsynced_entry(ordering: VersionOrdering, metrics: &Metrics) -> Option<super::Entry> {
    let spec = EntrySpec {
        id: UNSYNCED_ID.into(),
        versions: "*".into(),
        reason:
            "this instance has not synced with the fleet store yet and has no last-known-good copy"
                .into(),
        created_at: super::unix_now(),
        expires_at: None,
        status: 503,
        retry_after: UNSYNCED_RETRY_AFTER.into(),
        jitter: super::DEFAULT_JITTER,
        close_existing: false,
        drain: "0s".into(),
        created_by: Some("fwgate".into()),
    };
    match compile_entry(spec, ordering, metrics) {
        Ok(mut e) => {
            e.scope = Scope::System;
            Some(e)
        }
        Err(e) => {
            // A constant spec; if it ever failed to compile, say so loudly. Readiness still
            // reports the instance as not synced.
            tracing::error!(error = %e, "cannot build the fleet-unsynced refusal");
            None
        }
    }
}

/// Compiles the fleet's entries (spec and store revision each), scoped as fleet entries. An
/// entry that does not compile is left out and reported; the caller decides what that means
/// (the fleet applier keeps the previous version of such an entry).
pub fn compile_shared(
    specs: Vec<(EntrySpec, i64)>,
    ordering: VersionOrdering,
    metrics: &Metrics,
) -> (Vec<super::Entry>, Vec<KillSwitchError>) {
    let mut entries = Vec::with_capacity(specs.len());
    let mut errors = Vec::new();
    for (spec, revision) in specs {
        match compile_entry(spec, ordering, metrics) {
            Ok(mut e) => {
                e.scope = Scope::Fleet { revision };
                entries.push(e);
            }
            Err(e) => errors.push(e),
        }
    }
    (entries, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::VersionInput;
    use crate::version::FirmwareVersion;

    fn spec(id: &str, versions: &str) -> EntrySpec {
        serde_json::from_value(serde_json::json!({
            "id": id, "versions": versions, "reason": "r", "created_at": 1
        }))
        .unwrap()
    }

    #[test]
    fn unsynced_refuses_everything_then_fleet_and_local_entries_combine() {
        let m = Metrics::new();
        let o = VersionOrdering::Firmware;
        let local = super::super::compile_state(
            super::super::StateFile {
                version: 1,
                entries: vec![spec("l", "<2")],
            },
            o,
            &m,
        )
        .unwrap();
        let mut layers = Layers {
            local: Arc::new(local),
            shared: SharedLayer::Unsynced,
        };
        let set = layers.compose(o, &m);
        let v = VersionInput::Parsed(FirmwareVersion::parse("9.0.0").unwrap());
        let hit = set.find(&v).unwrap();
        assert_eq!(hit.spec.id, UNSYNCED_ID);
        assert_eq!(hit.scope, Scope::System);
        assert!(set.find(&VersionInput::Missing).is_some());
        let (shared, errors) = compile_shared(vec![(spec("f", ">=9"), 7)], o, &m);
        assert!(errors.is_empty());
        layers.shared = SharedLayer::Synced(shared);
        let set = layers.compose(o, &m);
        assert_eq!(set.find(&v).unwrap().scope, Scope::Fleet { revision: 7 });
        let old = VersionInput::Parsed(FirmwareVersion::parse("1.0.0").unwrap());
        assert_eq!(set.find(&old).unwrap().scope, Scope::Local);
        assert!(set
            .find(&VersionInput::Parsed(
                FirmwareVersion::parse("5.0.0").unwrap()
            ))
            .is_none());
        let (_, errors) = compile_shared(vec![(spec("bad", ">=3.8,"), 8)], o, &m);
        assert_eq!(errors.len(), 1);
    }
}
