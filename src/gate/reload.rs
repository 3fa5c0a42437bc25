//! Putting a new rule set in force: reloads from the rules file (serialised, skipped when the
//! content is unchanged), installs from a fleet store, and the spread-out close of open
//! connections the new rules refuse.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{unix_now, Gate};
use crate::audit::AuditEvent;
use crate::diag::FileErrors;
use crate::limits::LimitStore;
use crate::metrics::{Metrics, ReloadLabel, ReloadResult};
use crate::registry::{close_reason, cut_to, CloseCause, CloseOrder};
use crate::rules::{file, Action, DecidedBy, Decider, RuleSet};

/// What the last reload attempt did, for `/v1/rules` and `POST /v1/reload`.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    /// The error of the last failed attempt, cleared by the next successful one.
    pub last_error: Option<String>,
    /// Unix seconds of the last attempt (successful or not).
    pub last_attempt_unix: Option<u64>,
}

/// Result of a reload that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new rule set is in force with this generation.
    Applied {
        /// The new generation.
        generation: u64,
        /// Open connections that will be closed because the new rules refuse them.
        closing: usize,
    },
    /// The file's content hash is unchanged; nothing was done.
    Unchanged {
        /// The generation still in force.
        generation: u64,
    },
}

impl Gate {
    /// Re-reads the rules file and, if valid and changed, puts it in force. An invalid file
    /// keeps the old rules and is reported (log, metric, `/v1/rules`). Serialised: concurrent
    /// triggers (watcher, SIGHUP, API) never interleave.
    pub async fn reload(&self, force: bool) -> Result<ReloadOutcome, FileErrors> {
        let _serial = self.reload_lock.lock().await;
        if self.rules_from_shared() {
            tracing::info!("the rules in force come from the fleet store (fwgate rules push); the local rules file is not reloaded");
            return Ok(ReloadOutcome::Unchanged {
                generation: self.generation.load(Ordering::Relaxed),
            });
        }
        let Some(path) = self.config.rules_path.clone() else {
            return Ok(ReloadOutcome::Unchanged {
                generation: self.generation.load(Ordering::Relaxed),
            });
        };
        let result = tokio::task::spawn_blocking({
            let metrics = self.metrics.clone();
            let limits = self.limit_store.clone();
            let next = self.generation.load(Ordering::Relaxed) + 1;
            let current_hash = self.rules().source.content_hash.clone();
            move || compile_if_changed(&path, &metrics, &limits, next, &current_hash, force)
        })
        .await
        .unwrap_or_else(|e| {
            Err(FileErrors::from(crate::diag::FileError::whole(
                Path::new("rules"),
                format!("reload task failed: {e}"),
            )))
        });
        self.finish_reload(result)
    }

    /// Records a reload attempt's outcome (status for `/v1/rules`, metrics, log) and puts a
    /// compiled rule set in force.
    pub(super) fn finish_reload(
        &self,
        result: Result<Option<RuleSet>, FileErrors>,
    ) -> Result<ReloadOutcome, FileErrors> {
        let mut status = self.reload_status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_attempt_unix = Some(unix_now());
        match result {
            Ok(None) => {
                // The file is the one in force, so it is valid: an error from an edit since
                // reverted no longer describes it.
                if let Some(previous) = status.last_error.take() {
                    tracing::info!(previous_error = %previous, "rules file is valid again (the rules in force); reload error cleared");
                }
                Ok(ReloadOutcome::Unchanged {
                    generation: self.generation.load(Ordering::Relaxed),
                })
            }
            Ok(Some(rules)) => {
                status.last_error = None;
                drop(status);
                Ok(self.install(rules))
            }
            Err(errors) => {
                status.last_error = Some(errors.to_string());
                drop(status);
                self.audit.record(AuditEvent {
                    action: "rules_error",
                    detail: Some(format!("previous rules stay in force: {errors}")),
                    ..AuditEvent::default()
                });
                self.metrics
                    .rules_reloads
                    .get_or_create(&ReloadLabel {
                        result: ReloadResult::error,
                    })
                    .inc();
                tracing::error!(errors = %errors, "rules reload failed; the previous rules stay in force");
                Err(errors)
            }
        }
    }

    /// Puts a compiled rule set in force and closes open connections it refuses under rules
    /// that ask for it (`close_existing`), spread over their drain period.
    pub fn install(&self, rules: RuleSet) -> ReloadOutcome {
        let generation = rules.source.generation;
        let names: std::collections::HashSet<&str> =
            rules.rules.iter().map(|r| &*r.decider.name).collect();
        self.limit_store.retain(&names);
        for w in &rules.warnings {
            tracing::warn!(warning = %w, "rules warning");
        }
        self.generation.store(generation, Ordering::Relaxed);
        let ordering = rules.ordering;
        let detail = format!(
            "generation {generation}, {} rule(s), content {}",
            rules.rules.len(),
            rules.source.content_hash
        );
        let previous = self.rules.swap(Arc::new(rules));
        *self
            .previous_rules
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            Some((previous.source.generation, previous.source.text.clone()));
        if previous.ordering != ordering {
            self.recompile_kill_entries(ordering);
        }
        self.audit.record(AuditEvent {
            action: "rules_applied",
            detail: Some(detail),
            ..AuditEvent::default()
        });
        self.metrics
            .rules_reloads
            .get_or_create(&ReloadLabel {
                result: ReloadResult::ok,
            })
            .inc();
        self.metrics.rules_generation.set(generation as i64);
        self.metrics
            .rules_last_reload_success
            .set(unix_now() as f64);
        let closing = self.close_refused();
        tracing::info!(generation, closing, "rules in force");
        ReloadOutcome::Applied {
            generation,
            closing,
        }
    }

    /// Plans and starts closing the open connections the current rules refuse with
    /// `close_existing`; returns how many.
    pub fn close_refused(&self) -> usize {
        let snap = self.snapshot();
        // One reason per decider, shared by the connections it closes.
        let mut reasons: std::collections::HashMap<Arc<str>, Arc<str>> = Default::default();
        let plan = self.registry.plan_close(|t| {
            let d = self.decide(&snap, &t.version, &t.path);
            if d.admits() || !d.decider.close_existing {
                return None;
            }
            let cause = match d.by {
                DecidedBy::KillSwitch => CloseCause::KillSwitch,
                _ => CloseCause::Policy,
            };
            let reason = reasons
                .entry(d.decider.name.clone())
                .or_insert_with(|| close_reason_for(d.decider))
                .clone();
            Some(CloseOrder {
                drain: d.decider.drain,
                cause,
                reason: Some(reason),
            })
        });
        let n = plan.len();
        let counter = self.metrics.tunnels_closed_by_policy.clone();
        plan.execute(move || {
            counter.inc();
        });
        n
    }
}

/// What a WebSocket device that `decider` closes is told in its Close frame: who refused it,
/// in the words of its refusal body, and the refusal's base `Retry-After` when it has one.
/// The retry part is kept whole when a long name has to be cut to fit the frame.
pub(super) fn close_reason_for(decider: &Decider) -> Arc<str> {
    let who = match decider.name.strip_prefix("killswitch:") {
        Some(id) => format!("refused by emergency kill switch {id}"),
        None => format!("refused by rule {}", decider.name),
    };
    let retry = match &decider.action {
        Action::Deny(r) => r.retry_after,
        _ => None,
    };
    let Some(retry) = retry else {
        return close_reason(&who);
    };
    let retry = format!("; retry after {}s", retry.as_secs().max(1));
    let room = crate::registry::MAX_CLOSE_REASON_BYTES.saturating_sub(retry.len());
    close_reason(&format!("{}{retry}", cut_to(&who, room)))
}

/// Compiles the rules file unless its content hash is unchanged (and `force` is off).
fn compile_if_changed(
    path: &Path,
    metrics: &Metrics,
    limits: &LimitStore,
    generation: u64,
    current_hash: &str,
    force: bool,
) -> Result<Option<RuleSet>, FileErrors> {
    let text = std::fs::read(path)
        .map_err(|e| crate::diag::FileError::whole(path, format!("cannot read rules file: {e}")))?;
    if !force && crate::rules::content_hash(&text) == current_hash {
        return Ok(None);
    }
    let text = String::from_utf8(text)
        .map_err(|_| crate::diag::FileError::whole(path, "rules file is not valid UTF-8"))?;
    file::compile_with_limits(&text, Some(path), metrics, limits, generation).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::DecisionKind;
    use crate::rules::Refusal;
    use std::time::Duration;

    fn deny(name: &str, retry_after: Option<Duration>) -> Decider {
        let metrics = Metrics::new();
        Decider {
            counters: metrics.rule_counters_for(name, &[DecisionKind::deny], false),
            name: Arc::from(name),
            action: Action::Deny(Refusal {
                retry_after,
                ..Refusal::default_deny()
            }),
            close_existing: true,
            drain: Duration::ZERO,
            health: None,
        }
    }

    #[test]
    fn close_reasons_name_the_rule_or_entry_and_keep_the_retry_delay_whole() {
        let secs = Duration::from_secs;
        assert_eq!(
            &*close_reason_for(&deny("block", Some(secs(30)))),
            "refused by rule block; retry after 30s"
        );
        assert_eq!(
            &*close_reason_for(&deny("killswitch:k-3", Some(secs(300)))),
            "refused by emergency kill switch k-3; retry after 300s"
        );
        assert_eq!(
            &*close_reason_for(&deny("block", None)),
            "refused by rule block"
        );
        let long = close_reason_for(&deny(&"r".repeat(300), Some(secs(30))));
        assert_eq!(long.len(), crate::registry::MAX_CLOSE_REASON_BYTES);
        assert!(long.ends_with("rrr; retry after 30s"), "{long}");
    }
}
