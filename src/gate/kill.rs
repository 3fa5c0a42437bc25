//! Kill-switch changes through the gate: to this instance's state file or the fleet's store,
//! with their impact on open connections and an audit event each.

use std::sync::Arc;

use super::Gate;
use crate::audit::AuditEvent;
use crate::killswitch::{self, EntrySpec, KillSwitchError, StateFile};
use crate::metrics::KillSwitchAction;
use crate::registry::{CloseCause, CloseOrder};
use crate::shared::SharedChange;

/// Where a kill-switch change goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillTarget {
    /// The fleet's store in fleet mode, else this instance's state file.
    Default,
    /// This instance only (`?scope=local`), even in fleet mode.
    Local,
}

/// A kill-switch addition: its impact here, and how far it spread through a shared store.
#[derive(Debug, Clone)]
pub struct KillOutcome {
    /// Open connections on this instance.
    pub impact: Impact,
    /// `Some` when the change went through the fleet's store.
    pub shared: Option<SharedChange>,
}

/// What a kill-switch change did to open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Impact {
    /// Open connections the entry matches.
    pub matching: usize,
    /// How many of them are being closed (0 with `close_existing = false` or a dry run).
    pub closing: usize,
}

impl Gate {
    fn kill_state_path(&self) -> Result<&std::path::Path, KillSwitchError> {
        self.kill_path.as_deref().ok_or_else(|| {
            KillSwitchError::Invalid(
                "no state_dir configured: kill-switch entries must be persisted; set state_dir in fwgate.toml".into(),
            )
        })
    }

    /// Counts the open connections `entry` matches and, unless `dry_run`, closes those it
    /// should close (spread over its drain).
    fn kill_impact(&self, entry: &killswitch::Entry, dry_run: bool) -> Impact {
        let mut matching = 0;
        let reason = super::reload::close_reason_for(&entry.decider);
        let plan = self.registry.plan_close(|t| {
            if !entry.matches(&t.version) {
                return None;
            }
            matching += 1;
            (!dry_run && entry.decider.close_existing).then(|| CloseOrder {
                drain: entry.decider.drain,
                cause: CloseCause::KillSwitch,
                reason: Some(reason.clone()),
            })
        });
        let closing = plan.len();
        let counter = self.metrics.tunnels_closed_by_policy.clone();
        plan.execute(move || {
            counter.inc();
        });
        Impact { matching, closing }
    }

    /// Adds (or replaces, same id) an entry: persisted before this returns, in force for the
    /// very next handshake. With `dry_run`, only reports the impact. In fleet mode the entry
    /// goes to the fleet's store (see [`Gate::kill_add_to`]).
    pub async fn kill_add(
        &self,
        spec: EntrySpec,
        dry_run: bool,
    ) -> Result<Impact, KillSwitchError> {
        self.kill_add_to(spec, dry_run, KillTarget::Default, None)
            .await
            .map(|o| o.impact)
    }

    /// [`Gate::kill_add`] with a target: in fleet mode, [`KillTarget::Default`] writes to the
    /// fleet's store (compare-and-set against `expect`, or against what this instance last
    /// applied) and returns once this instance applied it; [`KillTarget::Local`] (and any
    /// target outside fleet mode) writes this instance's state file.
    pub async fn kill_add_to(
        &self,
        spec: EntrySpec,
        dry_run: bool,
        target: KillTarget,
        expect: Option<i64>,
    ) -> Result<KillOutcome, KillSwitchError> {
        self.check_shared_attached(target)?;
        if let (KillTarget::Default, Some(store)) = (target, self.shared_store()) {
            let ordering = self.rules().ordering;
            let entry = killswitch::compile_entry(spec.clone(), ordering, &self.metrics)?;
            let change = store.add_entry(&spec, expect, dry_run).await?;
            if !dry_run {
                self.audit.record(AuditEvent::added(
                    &spec,
                    Some(format!(
                        "fleet-wide through {}{}{}",
                        store.describe(),
                        change
                            .convergence
                            .as_ref()
                            .map(|c| format!(", revision {}", c.revision))
                            .unwrap_or_default(),
                        spec.expires_at
                            .map(|at| format!(", expires at {at} (unix)"))
                            .unwrap_or_default()
                    )),
                ));
            }
            // Applying the store's update closed what the entry closes; report the matches.
            let mut impact = self.kill_impact(&entry, true);
            if !dry_run && entry.decider.close_existing {
                impact.closing = impact.matching;
            }
            return Ok(KillOutcome {
                impact,
                shared: Some(change),
            });
        }
        self.kill_add_local(spec, dry_run)
            .await
            .map(|impact| KillOutcome {
                impact,
                shared: None,
            })
    }

    async fn kill_add_local(
        &self,
        spec: EntrySpec,
        dry_run: bool,
    ) -> Result<Impact, KillSwitchError> {
        let _serial = self.kill_lock.lock().await;
        let ordering = self.rules().ordering;
        let entry = killswitch::compile_entry(spec.clone(), ordering, &self.metrics)?;
        // A dry run fails wherever the real add would: checked before it returns.
        let path = self.kill_state_path()?.to_path_buf();
        let now = killswitch::unix_now();
        let current = self.local_kill_set();
        let mut specs: Vec<EntrySpec> = current
            .entries
            .iter()
            .filter(|e| e.active_at(now) && e.spec.id != spec.id)
            .map(|e| e.spec.clone())
            .collect();
        specs.push(spec.clone());
        if specs.len() > killswitch::MAX_ENTRIES {
            return Err(KillSwitchError::Invalid(format!(
                "at most {} kill-switch entries; remove some first",
                killswitch::MAX_ENTRIES
            )));
        }
        if dry_run {
            return Ok(self.kill_impact(&entry, true));
        }
        self.kill_commit(&path, specs, ordering, KillSwitchAction::add)?;
        tracing::warn!(target: "fwgate::audit", action = "kill_add", id = %spec.id, versions = %spec.versions, reason = %spec.reason, by = spec.created_by.as_deref(), expires_at = spec.expires_at, status = spec.status, "kill-switch entry added");
        self.audit.record(AuditEvent::added(
            &spec,
            spec.expires_at.map(|at| format!("expires at {at} (unix)")),
        ));
        Ok(self.kill_impact(&entry, false))
    }

    /// Removes an entry; `Ok(None)` if there is no such id. In fleet mode it is removed from
    /// the fleet's store (see [`Gate::kill_remove_from`]).
    pub async fn kill_remove(
        &self,
        id: &str,
        actor: Option<&str>,
    ) -> Result<Option<EntrySpec>, KillSwitchError> {
        self.kill_remove_from(id, actor, KillTarget::Default, None)
            .await
            .map(|r| r.map(|(spec, _)| spec))
    }

    /// [`Gate::kill_remove`] with a target (as in [`Gate::kill_add_to`]).
    pub async fn kill_remove_from(
        &self,
        id: &str,
        actor: Option<&str>,
        target: KillTarget,
        expect: Option<i64>,
    ) -> Result<Option<(EntrySpec, Option<SharedChange>)>, KillSwitchError> {
        self.check_shared_attached(target)?;
        if let (KillTarget::Default, Some(store)) = (target, self.shared_store()) {
            let removed = store.remove_entry(id, actor, expect).await?;
            if let Some((spec, change)) = &removed {
                self.audit.record(AuditEvent {
                    action: "kill_remove",
                    id: Some(id.to_string()),
                    versions: Some(spec.versions.clone()),
                    reason: Some(spec.reason.clone()),
                    by: actor.map(str::to_string),
                    detail: Some(format!(
                        "fleet-wide through {}{}",
                        store.describe(),
                        change
                            .convergence
                            .as_ref()
                            .map(|c| format!(", revision {}", c.revision))
                            .unwrap_or_default()
                    )),
                    ..AuditEvent::default()
                });
            }
            return Ok(removed.map(|(spec, change)| (spec, Some(change))));
        }
        Ok(self
            .kill_remove_local(id, actor)
            .await?
            .map(|spec| (spec, None)))
    }

    async fn kill_remove_local(
        &self,
        id: &str,
        actor: Option<&str>,
    ) -> Result<Option<EntrySpec>, KillSwitchError> {
        let _serial = self.kill_lock.lock().await;
        let path = self.kill_state_path()?.to_path_buf();
        let current = self.local_kill_set();
        let Some(removed) = current.entries.iter().find(|e| e.spec.id == id) else {
            return Ok(None);
        };
        let now = killswitch::unix_now();
        let specs = current
            .entries
            .iter()
            .filter(|e| e.spec.id != id && e.active_at(now))
            .map(|e| e.spec.clone())
            .collect();
        self.kill_commit(
            &path,
            specs,
            self.rules().ordering,
            KillSwitchAction::remove,
        )?;
        tracing::warn!(target: "fwgate::audit", action = "kill_remove", id = %id, versions = %removed.spec.versions, by = actor, "kill-switch entry removed");
        self.audit.record(AuditEvent {
            action: "kill_remove",
            id: Some(id.to_string()),
            versions: Some(removed.spec.versions.clone()),
            reason: Some(removed.spec.reason.clone()),
            by: actor.map(str::to_string),
            ..AuditEvent::default()
        });
        Ok(Some(removed.spec.clone()))
    }

    fn kill_commit(
        &self,
        path: &std::path::Path,
        specs: Vec<EntrySpec>,
        ordering: crate::version::VersionOrdering,
        action: KillSwitchAction,
    ) -> Result<(), KillSwitchError> {
        let state = StateFile {
            version: 1,
            entries: specs,
        };
        let set = killswitch::compile_state(state.clone(), ordering, &self.metrics)?;
        let bytes = killswitch::write_state(path, &state)?;
        *self.kill_hash.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::rules::content_hash(&bytes);
        self.set_kill_layer(|l| l.local = Arc::new(set));
        self.metrics.killswitch_change(action);
        Ok(())
    }

    /// Re-reads the kill-switch file after an outside change (by hand, configuration
    /// management). An unusable file keeps the entries in force and is reported.
    pub async fn reload_killswitch(&self) {
        let Some(path) = self.kill_path.clone() else {
            return;
        };
        let _serial = self.kill_lock.lock().await;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => killswitch::EMPTY_STATE.to_vec(),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read kill-switch state; entries in force are kept");
                self.metrics.killswitch_state_errors.inc();
                return;
            }
        };
        let hash = crate::rules::content_hash(&bytes);
        if *self.kill_hash.lock().unwrap_or_else(|e| e.into_inner()) == hash {
            return;
        }
        let parsed = serde_json::from_slice::<StateFile>(&bytes)
            .map_err(|e| {
                KillSwitchError::Invalid(format!("line {} column {}: {e}", e.line(), e.column()))
            })
            .and_then(|s| killswitch::compile_state(s, self.rules().ordering, &self.metrics));
        match parsed {
            Ok(set) => {
                *self.kill_hash.lock().unwrap_or_else(|e| e.into_inner()) = hash;
                tracing::warn!(target: "fwgate::audit", action = "kill_file", file = %path.display(), entries = set.entries.len(), "kill-switch entries changed on disk");
                self.audit.record(AuditEvent {
                    action: "kill_file",
                    detail: Some(format!(
                        "{} entries from {}",
                        set.entries.len(),
                        path.display()
                    )),
                    ..AuditEvent::default()
                });
                self.set_kill_layer(|l| l.local = Arc::new(set));
                self.metrics.killswitch_change(KillSwitchAction::file);
                let closing = self.close_refused();
                if closing > 0 {
                    tracing::warn!(
                        closing,
                        "closing connections refused by kill-switch entries"
                    );
                }
            }
            Err(e) => {
                self.metrics.killswitch_state_errors.inc();
                tracing::error!(file = %path.display(), error = %e, "invalid kill-switch state on disk; entries in force are kept");
            }
        }
    }

    /// Where the kill-switch state lives (for the watcher).
    pub fn kill_state_file(&self) -> Option<&std::path::Path> {
        self.kill_path.as_deref()
    }
}
