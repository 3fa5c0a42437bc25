//! What this instance has applied from the store ([`View`]), and how a batch of store changes
//! (a full range, or a watch message's events) becomes the gate's state.
//!
//! Every document is validated before it is applied. An invalid kill-switch entry is ignored
//! and the previous version of that key (if any) stays in force; an invalid rules document
//! keeps the rules in force. Both are logged and counted (`fwgate_fleet_invalid_documents_total`,
//! and for rules also `fwgate_rules_reloads_total{result="error"}` and `/v1/rules` `last_error`).
//! After each applied batch the last-known-good copy is rewritten.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::cache::{self, CacheFile, CachedEntry, CachedRules};
use super::etcd::escape;
use super::etcd::types::KeyValue;
use super::keys::{unix_ms, RulesDoc, Stamp, StateKey};
use super::{FleetCore, Source};
use crate::diag::{FileError, FileErrors};
use crate::gate::Gate;
use crate::killswitch::{self, EntrySpec};
use crate::metrics::FleetDocKind;
use crate::version::VersionOrdering;

/// A document with the store revisions it was read at.
#[derive(Debug, Clone)]
pub struct Applied<T> {
    /// The document.
    pub value: T,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// Revision of its creation.
    pub create_revision: i64,
}

/// The fleet state this instance has in force.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Kill-switch entries by id.
    pub entries: BTreeMap<String, Applied<EntrySpec>>,
    /// The last rules document that compiled (with `rules = true`).
    pub rules: Option<Applied<Arc<RulesDoc>>>,
    /// Revision of the rules key last seen, valid or not (0: absent).
    pub rules_seen: i64,
    /// The applied state revision: the newest change under `state/` applied.
    pub revision: i64,
    /// Every change up to this store revision has been seen: a watch resumes after it.
    pub seen: i64,
}

impl View {
    /// Entry specs with their revisions, in creation order.
    pub fn entry_specs(&self) -> Vec<(EntrySpec, i64)> {
        let mut list: Vec<&Applied<EntrySpec>> = self.entries.values().collect();
        list.sort_by_key(|a| (a.create_revision, a.value.id.clone()));
        list.into_iter()
            .map(|a| (a.value.clone(), a.mod_revision))
            .collect()
    }

    fn entry_revisions(&self) -> Vec<(&str, i64)> {
        self.entries
            .iter()
            .map(|(k, a)| (k.as_str(), a.mod_revision))
            .collect()
    }

    /// The copy to keep in `state_dir`.
    pub fn to_copy(&self, prefix: &str) -> CacheFile {
        CacheFile {
            version: 1,
            prefix: prefix.to_string(),
            revision: self.revision,
            saved_at_ms: unix_ms(),
            entries: self
                .entries
                .values()
                .map(|a| CachedEntry {
                    mod_revision: a.mod_revision,
                    create_revision: a.create_revision,
                    spec: a.value.clone(),
                })
                .collect(),
            rules: self.rules.as_ref().map(|r| CachedRules {
                mod_revision: r.mod_revision,
                doc: (*r.value).clone(),
            }),
        }
    }
}

/// One change under `state/`.
#[derive(Debug, Clone)]
pub enum Change {
    /// A key was written.
    Put(KeyValue),
    /// A key was deleted at `mod_revision`.
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The deletion's revision.
        mod_revision: i64,
    },
}

impl Change {
    fn key_and_revision(&self) -> (&[u8], i64) {
        match self {
            Change::Put(kv) => (&kv.key, kv.mod_revision),
            Change::Delete { key, mod_revision } => (key, *mod_revision),
        }
    }
}

/// What to apply.
#[derive(Debug)]
pub enum Batch {
    /// Everything under `state/` at `header_revision`: replaces the whole state, so keys
    /// deleted meanwhile (e.g. while disconnected past a compaction) disappear.
    Full {
        /// The keys.
        kvs: Vec<KeyValue>,
        /// The range's revision.
        header_revision: i64,
    },
    /// A watch message's events, in revision order.
    Events(Vec<Change>),
}

/// Validates a stored kill-switch entry: the same JSON and rules as `killswitch.json`, and the
/// id in the document matches the key.
pub fn parse_entry(id: &str, value: &[u8], ordering: VersionOrdering) -> Result<EntrySpec, String> {
    let spec: EntrySpec = serde_json::from_slice(value).map_err(|e| {
        format!(
            "not a kill-switch entry (line {} column {}): {e}",
            e.line(),
            e.column()
        )
    })?;
    if spec.id != id {
        return Err(format!(
            "the entry's id {:?} does not match its key's {id:?}",
            spec.id
        ));
    }
    killswitch::compile_entry(spec.clone(), ordering, &crate::metrics::Metrics::new())
        .map_err(|e| e.to_string())?;
    Ok(spec)
}

/// Validates a stored rules document's envelope (the text itself is compiled by the gate).
pub fn parse_rules_doc(value: &[u8]) -> Result<RulesDoc, String> {
    let doc: RulesDoc = serde_json::from_slice(value).map_err(|e| {
        format!(
            "not a fwgate rules document (publish with `fwgate rules push`): line {} column {}: {e}",
            e.line(),
            e.column()
        )
    })?;
    let hash = crate::rules::content_hash(doc.text.as_bytes());
    if hash != doc.hash {
        return Err(format!(
            "content hash {} does not match the text ({hash}): the document was altered",
            doc.hash
        ));
    }
    Ok(doc)
}

fn invalid(core: &FleetCore, kind: FleetDocKind, key: &[u8], error: &str) {
    core.metrics.fleet_invalid_document(kind);
    let key = escape(&String::from_utf8_lossy(key));
    let error = escape(error);
    tracing::error!(key = %key, error = %error, "invalid document in the fleet store; ignored (what was in force for it stays in force)");
    let mut s = core.status.lock().unwrap_or_else(|e| e.into_inner());
    s.last_invalid_document = Some(format!("{key}: {error}"));
}

/// Applies a batch: entries to the gate, rules (with `rules = true`), status, metrics, the
/// applied revision, the copy. Only the sync task calls this, so batches never interleave.
pub async fn apply(core: &FleetCore, gate: &Gate, batch: Batch) {
    let before = core.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let ordering = gate.rules().ordering;
    let mut next = before.clone();
    let mut rules_change: Option<Option<KeyValue>> = None;
    let mut stamp: Option<(Stamp, i64)> = None;
    let (full, changes) = match batch {
        Batch::Full {
            kvs,
            header_revision,
        } => {
            next.entries.clear();
            next.revision = 0;
            // Authoritative: everything up to here is in this read (also when the store was
            // restored from a backup and its revisions went back).
            next.seen = header_revision;
            let has_rules = kvs
                .iter()
                .any(|kv| core.keys.classify(&kv.key) == StateKey::Rules);
            if !has_rules && before.rules_seen != 0 {
                rules_change = Some(None);
            }
            (true, kvs.into_iter().map(Change::Put).collect::<Vec<_>>())
        }
        Batch::Events(changes) => (false, changes),
    };
    for change in changes {
        let (key, revision) = change.key_and_revision();
        let key = key.to_vec();
        next.revision = next.revision.max(revision);
        if !full {
            next.seen = next.seen.max(revision);
        }
        match core.keys.classify(&key) {
            StateKey::Entry(id) => match change {
                Change::Put(kv) => match parse_entry(&id, &kv.value, ordering) {
                    Ok(spec) => {
                        next.entries.insert(
                            id,
                            Applied {
                                value: spec,
                                mod_revision: kv.mod_revision,
                                create_revision: kv.create_revision,
                            },
                        );
                    }
                    Err(e) => {
                        invalid(core, FleetDocKind::killswitch, &key, &e);
                        if let (true, Some(old)) = (full, before.entries.get(&id)) {
                            next.entries.insert(id, old.clone());
                        }
                    }
                },
                Change::Delete { .. } => {
                    next.entries.remove(&id);
                }
            },
            StateKey::Rules => match change {
                Change::Put(kv) if full && kv.mod_revision == before.rules_seen => {}
                Change::Put(kv) => rules_change = Some(Some(kv)),
                Change::Delete { .. } => rules_change = Some(None),
            },
            StateKey::Stamp => {
                if let Change::Put(kv) = change {
                    if let Ok(s) = serde_json::from_slice::<Stamp>(&kv.value) {
                        stamp = Some((s, kv.mod_revision));
                    }
                }
            }
            StateKey::Unknown => {}
        }
    }
    cap_entries(core, &mut next);
    let entries_changed = before.entry_revisions() != next.entry_revisions();
    if entries_changed || gate.fleet_unsynced() {
        for e in gate.install_shared_entries(next.entry_specs()) {
            invalid(
                core,
                FleetDocKind::killswitch,
                b"state/killswitch/",
                &e.to_string(),
            );
        }
    }
    let mut rules_changed = false;
    if let Some(change) = rules_change {
        rules_changed = true;
        apply_rules(core, gate, &mut next, change).await;
    }
    {
        let mut s = core.status.lock().unwrap_or_else(|e| e.into_inner());
        s.source = Source::Etcd;
    }
    core.metrics.fleet_applied(next.revision);
    if let Some((s, revision)) = stamp {
        // Only a change seen live measures propagation (a resync after an outage would count
        // the outage).
        if !full && revision > before.revision {
            let delay_ms = unix_ms().saturating_sub(s.at_ms);
            core.metrics.fleet_propagation(delay_ms as f64 / 1000.0);
        }
    }
    let changed = entries_changed || rules_changed || next.revision != before.revision || full;
    // The copy is on disk before the applied revision moves: whoever sees this instance report
    // a revision (the heartbeat, `kill add` waiting for the fleet) can rely on a restart with
    // the store down starting from at least that state.
    if changed {
        save_copy(core, &next).await;
    }
    *core.view.lock().unwrap_or_else(|e| e.into_inner()) = next.clone();
    core.applied.send_if_modified(|r| {
        let moved = *r != next.revision;
        *r = next.revision;
        moved
    });
}

/// Keeps at most [`killswitch::MAX_ENTRIES`] entries (the oldest), reporting the rest.
fn cap_entries(core: &FleetCore, view: &mut View) {
    if view.entries.len() <= killswitch::MAX_ENTRIES {
        return;
    }
    let keep: std::collections::HashSet<String> = view
        .entry_specs()
        .into_iter()
        .take(killswitch::MAX_ENTRIES)
        .map(|(s, _)| s.id)
        .collect();
    let dropped = view.entries.len() - keep.len();
    view.entries.retain(|id, _| keep.contains(id));
    invalid(
        core,
        FleetDocKind::killswitch,
        b"state/killswitch/",
        &format!(
            "more than {} entries in the store: the {dropped} newest are not applied",
            killswitch::MAX_ENTRIES
        ),
    );
}

async fn apply_rules(core: &FleetCore, gate: &Gate, next: &mut View, change: Option<KeyValue>) {
    let Some(kv) = change else {
        next.rules = None;
        next.rules_seen = 0;
        if core.config.rules {
            if let Err(e) = gate.release_shared_rules().await {
                tracing::error!(errors = %e, "the local rules file is invalid; the store's last rules stay in force");
            }
        }
        return;
    };
    next.rules_seen = kv.mod_revision;
    if !core.config.rules {
        return;
    }
    let origin = PathBuf::from(format!(
        "etcd:{}@{}",
        String::from_utf8_lossy(&kv.key),
        kv.mod_revision
    ));
    let doc = match parse_rules_doc(&kv.value) {
        Ok(doc) => doc,
        Err(e) => {
            invalid(core, FleetDocKind::rules, &kv.key, &e);
            gate.report_shared_rules_error(FileErrors::from(FileError::whole(&origin, e)));
            return;
        }
    };
    match gate.install_shared_rules(doc.text.clone(), origin).await {
        Ok(_) => {
            next.rules = Some(Applied {
                value: Arc::new(doc),
                mod_revision: kv.mod_revision,
                create_revision: kv.create_revision,
            })
        }
        // The gate logged it, counted it and shows it in /v1/rules.
        Err(e) => invalid(core, FleetDocKind::rules, &kv.key, &e.to_string()),
    }
}

async fn save_copy(core: &FleetCore, view: &View) {
    let copy = view.to_copy(core.keys.prefix());
    let path = core.cache_path.clone();
    let saved = tokio::task::spawn_blocking(move || cache::save(&path, &copy))
        .await
        .unwrap_or_else(|e| Err(format!("copy task failed: {e}")));
    if let Err(e) = saved {
        tracing::error!(error = %e, "cannot write the fleet state copy; a restart during a store outage would start from an older copy");
    }
}

/// Puts the last-known-good copy in force at start-up (before serving).
pub async fn install_copy(core: &FleetCore, gate: &Gate, copy: CacheFile) {
    let ordering = gate.rules().ordering;
    let mut view = View {
        revision: copy.revision,
        ..View::default()
    };
    for e in copy.entries {
        let id = e.spec.id.clone();
        match killswitch::compile_entry(e.spec.clone(), ordering, &core.metrics) {
            Ok(_) => {
                view.entries.insert(
                    id,
                    Applied {
                        value: e.spec,
                        mod_revision: e.mod_revision,
                        create_revision: e.create_revision,
                    },
                );
            }
            Err(err) => {
                tracing::error!(id = %id, error = %err, "entry in the fleet state copy does not compile; left out")
            }
        }
    }
    gate.install_shared_entries(view.entry_specs());
    if let Some(r) = copy.rules {
        view.rules_seen = r.mod_revision;
        if core.config.rules {
            let origin = PathBuf::from(format!("{}@{}", core.cache_path.display(), r.mod_revision));
            if gate
                .install_shared_rules(r.doc.text.clone(), origin)
                .await
                .is_ok()
            {
                view.rules = Some(Applied {
                    value: Arc::new(r.doc),
                    mod_revision: r.mod_revision,
                    create_revision: 0,
                });
            }
        }
    }
    tracing::warn!(
        revision = copy.revision,
        entries = view.entries.len(),
        rules = view.rules.is_some(),
        file = %core.cache_path.display(),
        "fleet state from the last-known-good copy is in force until the store answers"
    );
    core.metrics.fleet_applied(view.revision);
    core.applied.send_replace(view.revision);
    core.status.lock().unwrap_or_else(|e| e.into_inner()).source = Source::Cache;
    *core.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
}
