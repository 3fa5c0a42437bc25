//! The admission state shared by every connection: the rules in force (swapped atomically on
//! reload), metrics, the connection registry, and the backend client. One `Gate` per process.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::access_log::RefusalSampler;
use crate::census::Census;
use crate::config::Config;
use crate::diag::FileErrors;
use crate::metrics::{Metrics, ReloadLabel, ReloadResult};
use crate::proxy::forward::Upstream;
use crate::registry::Registry;
use crate::rules::{file, Action, Decision, RuleSet, VersionInput};

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

/// Shared admission state.
pub struct Gate {
    /// Process configuration (fixed for the process lifetime).
    pub config: Config,
    rules: ArcSwap<RuleSet>,
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Open tunnels.
    pub registry: Arc<Registry>,
    /// Budget for refusal log lines.
    pub refusal_log: RefusalSampler,
    /// The backend.
    pub upstream: Upstream,
    /// Handshakes per version, for `/v1/versions`.
    pub census: Census,
    generation: AtomicU64,
    reload_status: Mutex<ReloadStatus>,
    reload_lock: tokio::sync::Mutex<()>,
    draining: AtomicBool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Gate {
    /// Builds the gate around an initial rule set (which must already be valid).
    pub fn new(config: Config, rules: RuleSet, metrics: Arc<Metrics>) -> Result<Gate, String> {
        let upstream = Upstream::new(&config.upstream, metrics.upstream_connect_seconds.clone())?;
        let refusal_log = RefusalSampler::new(
            config.log.refusal_lines_per_second,
            metrics.access_log_suppressed.clone(),
        );
        let generation = rules.source.generation;
        metrics.rules_generation.set(generation as i64);
        metrics.rules_last_reload_success.set(unix_now() as f64);
        Ok(Gate {
            config,
            rules: ArcSwap::from_pointee(rules),
            metrics,
            registry: Arc::new(Registry::default()),
            refusal_log,
            upstream,
            census: Census::default(),
            generation: AtomicU64::new(generation),
            reload_status: Mutex::new(ReloadStatus::default()),
            reload_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
        })
    }

    /// The rules in force. Take one snapshot per request and keep it for the whole request.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    /// Decides one request against a snapshot.
    pub fn decide<'a>(
        &self,
        rules: &'a RuleSet,
        version: &VersionInput,
        path: &str,
    ) -> Decision<'a> {
        rules.decide(version, path)
    }

    /// Counts a decision in the metrics (one or two atomic adds).
    pub fn count(&self, decision: &Decision<'_>) {
        let c = &decision.decider.counters;
        match decision.decider.action {
            Action::Allow => c.allow.inc(),
            Action::Deny(_) => c.deny.inc(),
        };
        if let Some(shadow) = decision.shadow {
            match shadow.action {
                Action::Allow => shadow.counters.shadow_allow.inc(),
                Action::Deny(_) => shadow.counters.shadow_deny.inc(),
            };
        }
    }

    /// The last reload attempt's status.
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Whether the process is shutting down (readiness reports 503).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the process as shutting down.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Re-reads the rules file and, if valid and changed, puts it in force. An invalid file
    /// keeps the old rules and is reported (log, metric, `/v1/rules`). Serialised: concurrent
    /// triggers (watcher, SIGHUP, API) never interleave.
    pub async fn reload(&self, force: bool) -> Result<ReloadOutcome, FileErrors> {
        let _serial = self.reload_lock.lock().await;
        let Some(path) = self.config.rules_path.clone() else {
            return Ok(ReloadOutcome::Unchanged {
                generation: self.generation.load(Ordering::Relaxed),
            });
        };
        let result = tokio::task::spawn_blocking({
            let metrics = self.metrics.clone();
            let next = self.generation.load(Ordering::Relaxed) + 1;
            let current_hash = self.rules().source.content_hash.clone();
            move || compile_if_changed(&path, &metrics, next, &current_hash, force)
        })
        .await
        .unwrap_or_else(|e| {
            Err(FileErrors::from(crate::diag::FileError::whole(
                Path::new("rules"),
                format!("reload task failed: {e}"),
            )))
        });
        let mut status = self.reload_status.lock().unwrap_or_else(|e| e.into_inner());
        status.last_attempt_unix = Some(unix_now());
        match result {
            Ok(None) => Ok(ReloadOutcome::Unchanged {
                generation: self.generation.load(Ordering::Relaxed),
            }),
            Ok(Some(rules)) => {
                status.last_error = None;
                drop(status);
                Ok(self.install(rules))
            }
            Err(errors) => {
                status.last_error = Some(errors.to_string());
                drop(status);
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
        for w in &rules.warnings {
            tracing::warn!(warning = %w, "rules warning");
        }
        self.generation.store(generation, Ordering::Relaxed);
        self.rules.store(Arc::new(rules));
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
        let rules = self.rules();
        let plan = self.registry.plan_close(|t| {
            let d = self.decide(&rules, &t.version, &t.path);
            (!d.admits() && d.decider.close_existing).then_some(d.decider.drain)
        });
        let n = plan.len();
        let counter = self.metrics.tunnels_closed_by_policy.clone();
        plan.execute(move || {
            counter.inc();
        });
        n
    }
}

/// Compiles the rules file unless its content hash is unchanged (and `force` is off).
fn compile_if_changed(
    path: &Path,
    metrics: &Metrics,
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
    file::compile(&text, Some(path), metrics, generation).map(Some)
}
