//! The gate's side of the seam in [`crate::shared`]: kill-switch entries composed from layers
//! (this instance's, the fleet's, and the refuse-everything entry of a fleet member that has
//! not synced yet), the fleet's store for kill-switch changes, and rules text from the store.
//! The fleet module calls these; the per-request decision only ever sees the composed set.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Gate, KillTarget, ReloadOutcome};
use crate::audit::AuditEvent;
use crate::diag::FileErrors;
use crate::killswitch::layers::{Layers, SharedLayer};
use crate::killswitch::{self, EntrySpec, KillSet, KillSwitchError, StateFile};
use crate::rules::file;
use crate::shared::SharedStore;

impl Gate {
    /// Compiles the kill-switch entries in force again in `ordering`, after a rules reload
    /// switched it: a range is a set on one total order, and the entries must be decided in the
    /// same order as the rules. An entry that no longer compiles keeps the old set (logged).
    pub(super) fn recompile_kill_entries(&self, ordering: crate::version::VersionOrdering) {
        let mut layers = self.kill_layers.lock().unwrap_or_else(|e| e.into_inner());
        let local = StateFile {
            version: 1,
            entries: layers.local.specs(),
        };
        let local = killswitch::compile_state(local, ordering, &self.metrics);
        let shared = match &layers.shared {
            SharedLayer::Synced(entries) => {
                let specs = entries
                    .iter()
                    .map(|e| {
                        let revision = match e.scope {
                            killswitch::Scope::Fleet { revision } => revision,
                            _ => 0,
                        };
                        (e.spec.clone(), revision)
                    })
                    .collect();
                let (compiled, mut errors) =
                    killswitch::layers::compile_shared(specs, ordering, &self.metrics);
                match errors.pop() {
                    None => Ok(Some(SharedLayer::Synced(compiled))),
                    Some(e) => Err(e),
                }
            }
            _ => Ok(None),
        };
        match (local, shared) {
            (Ok(local), Ok(shared)) => {
                let count = local.entries.len();
                layers.local = Arc::new(local);
                if let Some(shared) = shared {
                    layers.shared = shared;
                }
                let set = layers.compose(ordering, &self.metrics);
                self.kill.store(Arc::new(set));
                tracing::info!(
                    ordering = ordering.as_str(),
                    entries = count,
                    "kill-switch entries compiled again in the new ordering"
                );
            }
            (Err(e), _) | (_, Err(e)) => {
                self.metrics.killswitch_state_errors.inc();
                tracing::error!(error = %e, ordering = ordering.as_str(), "kill-switch entries cannot be compiled in the new ordering; they keep the previous one");
            }
        }
    }

    /// Changes one layer of the kill-switch entries and puts the recomposed set in force.
    pub(super) fn set_kill_layer(&self, change: impl FnOnce(&mut Layers)) {
        let mut layers = self.kill_layers.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut layers);
        let set = layers.compose(self.rules().ordering, &self.metrics);
        self.metrics
            .killswitch_entries
            .set(set.entries.len() as i64);
        // Stored under the layers' lock, so two layer changes cannot swap in out of order.
        self.kill.store(Arc::new(set));
    }

    /// In fleet mode a change for the fleet needs the store: never fall back to this
    /// instance's file silently.
    pub(super) fn check_shared_attached(&self, target: KillTarget) -> Result<(), KillSwitchError> {
        if target == KillTarget::Default
            && self.config.fleet.is_some()
            && self.shared_store().is_none()
        {
            return Err(KillSwitchError::Unavailable(
                "fleet mode is configured but this instance could not join the fleet (see its log); nothing was changed. For this instance only: --local (?scope=local)".into(),
            ));
        }
        Ok(())
    }

    /// This instance's own entries (persisted in `state_dir`), without the fleet's.
    pub fn local_kill_set(&self) -> Arc<KillSet> {
        self.kill_layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .local
            .clone()
    }

    /// Connects the fleet's store: from now on kill-switch changes without `scope=local` go
    /// there. Set once, before serving; returns false if a store was already attached.
    pub fn attach_shared_store(&self, store: Arc<dyn SharedStore>) -> bool {
        self.shared_store.set(store).is_ok()
    }

    /// The fleet's store, in fleet mode.
    pub fn shared_store(&self) -> Option<Arc<dyn SharedStore>> {
        self.shared_store.get().cloned()
    }

    /// Puts the fleet's entries (spec and store revision each) in force alongside the local
    /// ones, marks the instance as synced, and closes open connections they refuse. Returns
    /// the entries that did not compile (left out; the caller validated them already).
    pub fn install_shared_entries(&self, specs: Vec<(EntrySpec, i64)>) -> Vec<KillSwitchError> {
        let (entries, errors) =
            killswitch::layers::compile_shared(specs, self.rules().ordering, &self.metrics);
        let count = entries.len();
        self.set_kill_layer(|l| l.shared = SharedLayer::Synced(entries));
        self.audit.record(AuditEvent {
            action: "kill_fleet",
            detail: Some(format!("{count} fleet entries in force")),
            ..AuditEvent::default()
        });
        let closing = self.close_refused();
        if closing > 0 {
            tracing::warn!(
                closing,
                "closing connections refused by the fleet's kill-switch entries"
            );
        }
        errors
    }

    /// Whether this fleet member still refuses everything because it has neither synced with
    /// the store nor loaded a last-known-good copy.
    pub fn fleet_unsynced(&self) -> bool {
        self.kill_layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unsynced()
    }

    /// Why `/readyz` answers 503, if it does.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.is_draining() {
            Some("draining\n")
        } else if self.fleet_unsynced() {
            Some("not synced with the fleet store yet (no last-known-good copy)\n")
        } else {
            None
        }
    }

    /// Whether the rules in force came from the fleet's store (the rules file is then not
    /// reloaded until the store's rules are deleted).
    pub fn rules_from_shared(&self) -> bool {
        self.rules_shared.load(Ordering::Relaxed)
    }

    /// Compiles rules text from the fleet's store and, if valid, puts it in force (exactly as a
    /// reload of the file would). An invalid text keeps the rules in force and is reported the
    /// same way (log, `fwgate_rules_reloads_total{result="error"}`, `/v1/rules` `last_error`).
    /// `origin` names the document in messages and in `/v1/rules` `source`.
    pub async fn install_shared_rules(
        &self,
        text: String,
        origin: PathBuf,
    ) -> Result<ReloadOutcome, FileErrors> {
        let _serial = self.reload_lock.lock().await;
        let result = tokio::task::spawn_blocking({
            let metrics = self.metrics.clone();
            let limits = self.limit_store.clone();
            let next = self.generation.load(Ordering::Relaxed) + 1;
            move || file::compile_with_limits(&text, Some(&origin), &metrics, &limits, next)
        })
        .await
        .unwrap_or_else(|e| {
            Err(FileErrors::from(crate::diag::FileError::whole(
                Path::new("rules"),
                format!("compile task failed: {e}"),
            )))
        })
        .map(Some);
        if result.is_ok() {
            self.rules_shared.store(true, Ordering::Relaxed);
        }
        self.finish_reload(result)
    }

    /// Reports a rules document from the fleet's store that could not even be read as rules
    /// (the rules in force stay), exactly like an invalid rules file.
    pub fn report_shared_rules_error(&self, errors: FileErrors) {
        let _ = self.finish_reload(Err(errors));
    }

    /// The store no longer has rules: the local rules file (or the built-in default) is put
    /// back in force.
    pub async fn release_shared_rules(&self) -> Result<ReloadOutcome, FileErrors> {
        if !self.rules_shared.swap(false, Ordering::Relaxed) {
            return Ok(ReloadOutcome::Unchanged {
                generation: self.generation.load(Ordering::Relaxed),
            });
        }
        tracing::warn!(
            "the fleet store has no rules any more; the local rules file is back in force"
        );
        if self.config.rules_path.is_none() {
            let embedded = file::compile(
                file::EMBEDDED_RULES,
                None,
                &self.metrics,
                self.generation.load(Ordering::Relaxed) + 1,
            );
            return self.finish_reload(embedded.map(Some));
        }
        self.reload(true).await
    }
}
