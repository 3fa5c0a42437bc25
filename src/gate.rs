//! The admission state shared by every connection: the rules in force (swapped atomically on
//! reload), metrics, the connection registry, and the backend client. One `Gate` per process.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::access_log::RefusalSampler;
use crate::audit::{AuditEvent, AuditTrail};
use crate::census::Census;
use crate::config::Config;
use crate::diag::FileErrors;
use crate::killswitch::layers::{Layers, SharedLayer};
use crate::killswitch::{self, EntrySpec, KillSet, KillSwitchError, StateFile};
use crate::limits::backoff::Backoff;
use crate::limits::{key_hash, Capacity, ConnPermit, GlobalLimits, LimitOutcome, LimitStore};
use crate::metrics::KillSwitchAction;
use crate::metrics::{DecisionKind, Metrics, ReloadLabel, ReloadResult};
use crate::proxy::forward::Upstream;
use crate::registry::{close_reason, CloseCause, CloseOrder, Registry};
use crate::rules::{
    file, jittered_wait_secs, Action, DecidedBy, Decider, Decision, Refusal, RuleSet, VersionInput,
};
use crate::shared::{SharedChange, SharedStore};
use std::net::IpAddr;

mod shared;

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

/// One consistent view for one decision: the rules and the kill-switch entries in force.
pub struct Snapshot {
    /// Rules in force.
    pub rules: Arc<RuleSet>,
    /// Kill-switch entries in force.
    pub kill: Arc<KillSet>,
}

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

/// Fixed deciders for refusals that no rule makes: process-wide limits, the backoff, backend capacity.
pub struct LimitDeciders {
    /// `global:per_ip_rate`.
    pub per_ip: Decider,
    /// `global:handshake_rate`.
    pub handshake_rate: Decider,
    /// `global:max_connections` (refused at accept).
    pub max_connections: Decider,
    /// `backoff`.
    pub backoff: Decider,
    /// `upstream:capacity`.
    pub upstream_capacity: Decider,
    /// `ambiguous`: repeated or conflicting version/device-id values, or a `Connection`
    /// header naming a header fwgate decides on (400; the body says which).
    pub ambiguous: Decider,
}

impl LimitDeciders {
    fn new(metrics: &Metrics, retry_after: std::time::Duration, jitter: f64) -> LimitDeciders {
        let make = |name: &str, body: &'static str| Decider {
            health: None,
            name: Arc::from(name),
            action: Action::Deny(Refusal {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                body: bytes::Bytes::from_static(body.as_bytes()),
                retry_after: Some(retry_after),
                jitter,
            }),
            // They only ever refuse, through `refuse_by` (counted `limited`).
            counters: metrics.rule_counters_for(name, &[DecisionKind::limited], false),
            close_existing: false,
            drain: std::time::Duration::ZERO,
        };
        LimitDeciders {
            per_ip: make(
                "global:per_ip_rate",
                "too many requests from this address, retry later\n",
            ),
            handshake_rate: make(
                "global:handshake_rate",
                "too many devices connecting, retry later\n",
            ),
            max_connections: make(
                "global:max_connections",
                "too many open connections, retry later\n",
            ),
            backoff: make("backoff", "reconnecting too often, retry later\n"),
            upstream_capacity: make("upstream:capacity", "backend at capacity, retry later\n"),
            ambiguous: Decider {
                health: None,
                name: Arc::from("ambiguous"),
                action: Action::Deny(Refusal {
                    status: http::StatusCode::BAD_REQUEST,
                    body: bytes::Bytes::from_static(b"ambiguous request\n"),
                    retry_after: None,
                    jitter: 0.0,
                }),
                counters: metrics.rule_counters_for("ambiguous", &[DecisionKind::deny], false),
                close_existing: false,
                drain: std::time::Duration::ZERO,
            },
        }
    }
}

/// What to do with a request once its decision and limits are applied.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Forward it, holding this limit slot (if any) while it is open.
    Forward(Option<ConnPermit>),
    /// Refuse it, counted as `kind` (`deny` or `limited`); the `Retry-After` (seconds) is
    /// given when computed rather than configured.
    Refuse(&'a Refusal, Option<u64>, DecisionKind),
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
    /// Limit state of `limit` rules, kept across reloads.
    pub limit_store: Arc<LimitStore>,
    /// Process-wide caps.
    pub global: GlobalLimits,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Cap on concurrent backend exchanges.
    pub upstream_capacity: Capacity,
    /// The recent audit trail, for `/v1/audit` and the console.
    pub audit: AuditTrail,
    /// The generation and text of the rules in force before the current ones (for the diff).
    previous_rules: Mutex<Option<(u64, Arc<str>)>>,
    /// Deciders for refusals by process-wide limits (names label metrics and logs).
    pub limit_deciders: LimitDeciders,
    kill: ArcSwap<KillSet>,
    kill_layers: Mutex<Layers>,
    shared_store: OnceLock<Arc<dyn SharedStore>>,
    rules_shared: AtomicBool,
    kill_path: Option<std::path::PathBuf>,
    kill_lock: tokio::sync::Mutex<()>,
    kill_hash: Mutex<String>,
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
    /// Builds the gate around an initial rule set (which must already be valid) and loads the
    /// kill-switch state from `state_dir` (falling back to its backup loudly; an error only when
    /// neither can be used).
    pub fn new(config: Config, rules: RuleSet, metrics: Arc<Metrics>) -> Result<Gate, String> {
        let kill_path = config
            .state_dir
            .as_ref()
            .map(|d| d.join(killswitch::STATE_FILE));
        let (kill, kill_hash) = match &kill_path {
            None => (KillSet::default(), String::new()),
            Some(path) => {
                let (set, fell_back) = killswitch::load_at_startup(path, rules.ordering, &metrics)
                    .map_err(|e| e.to_string())?;
                if fell_back {
                    metrics.killswitch_state_errors.inc();
                }
                let hash = std::fs::read(path)
                    .map(|b| crate::rules::content_hash(&b))
                    .unwrap_or_else(|_| crate::rules::content_hash(killswitch::EMPTY_STATE));
                (set, hash)
            }
        };
        let layers = Layers {
            local: Arc::new(kill),
            shared: if config.fleet.is_some() {
                SharedLayer::Unsynced
            } else {
                SharedLayer::Off
            },
        };
        let kill = layers.compose(rules.ordering, &metrics);
        metrics.killswitch_entries.set(kill.entries.len() as i64);
        let limits = &config.limits;
        let limit_store = Arc::new(LimitStore::new(limits.max_keys));
        for rule in &rules.rules {
            if let Action::Limit(l) = &rule.decider.action {
                limit_store.adopt(&rule.decider.name, l.state.clone());
            }
        }
        let global = GlobalLimits::new(
            limits.max_connections,
            limits.handshake_rate,
            limits.per_ip_rate,
            limits.max_keys,
        );
        let backoff = Backoff::new(limits.backoff);
        let upstream_capacity = Capacity::new(config.upstream.max_connections);
        let limit_deciders = LimitDeciders::new(&metrics, limits.retry_after, limits.jitter);
        let upstream = Upstream::new(
            &config.upstream,
            metrics.upstream_connect_seconds.clone(),
            metrics.upstream_pending.clone(),
        )?;
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
            limit_store,
            global,
            backoff,
            upstream_capacity,
            audit: AuditTrail::default(),
            previous_rules: Mutex::new(None),
            limit_deciders,
            kill: ArcSwap::from_pointee(kill),
            kill_layers: Mutex::new(layers),
            shared_store: OnceLock::new(),
            rules_shared: AtomicBool::new(false),
            kill_path,
            kill_lock: tokio::sync::Mutex::new(()),
            kill_hash: Mutex::new(kill_hash),
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

    /// The kill-switch entries in force.
    pub fn kill_set(&self) -> Arc<KillSet> {
        self.kill.load_full()
    }

    /// One consistent view for one request (two atomic loads).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            rules: self.rules(),
            kill: self.kill_set(),
        }
    }

    /// Decides one request: kill-switch entries first, then the rules.
    pub fn decide<'a>(
        &self,
        snap: &'a Snapshot,
        version: &VersionInput,
        path: &str,
    ) -> Decision<'a> {
        if let Some(entry) = snap.kill.find(version) {
            return Decision {
                decider: &entry.decider,
                by: DecidedBy::KillSwitch,
                shadow: None,
            };
        }
        snap.rules.decide(version, path)
    }

    /// Applies a decision: counts it, checks a `limit` rule's limiter, and says whether to
    /// forward or refuse. `device` (raw bytes) and `ip` key per-device and per-IP limits.
    pub fn apply<'a>(
        &self,
        decision: &Decision<'a>,
        device: Option<&[u8]>,
        ip: IpAddr,
    ) -> Verdict<'a> {
        if let Some(shadow) = decision.shadow {
            match shadow.action {
                Action::Deny(_) => shadow.counters.shadow_deny.inc(),
                _ => shadow.counters.shadow_allow.inc(),
            };
        }
        let c = &decision.decider.counters;
        match &decision.decider.action {
            Action::Allow => {
                c.allow.inc();
                Verdict::Forward(None)
            }
            Action::Deny(r) => {
                c.deny.inc();
                Verdict::Refuse(r, None, DecisionKind::deny)
            }
            Action::Limit(l) => match l.state.check(key_hash(device, ip, l.state.spec().key)) {
                LimitOutcome::Admit(permit) => {
                    c.allow.inc();
                    Verdict::Forward(permit)
                }
                LimitOutcome::RateLimited(wait) => {
                    c.limited.inc();
                    Verdict::Refuse(
                        &l.refusal,
                        Some(jittered_wait_secs(wait, l.refusal.jitter)),
                        DecisionKind::limited,
                    )
                }
                LimitOutcome::AtCapacity => {
                    c.limited.inc();
                    Verdict::Refuse(&l.refusal, None, DecisionKind::limited)
                }
            },
        }
    }

    /// Refuses through one of the fixed limit deciders (counted as `limited`).
    pub fn refuse_by<'a>(&self, decider: &'a Decider, retry_secs: Option<u64>) -> Verdict<'a> {
        decider.counters.limited.inc();
        match &decider.action {
            Action::Deny(r) => Verdict::Refuse(r, retry_secs, DecisionKind::limited),
            // The fixed deciders are all built as Deny above.
            _ => Verdict::Forward(None),
        }
    }

    /// Evicts idle limiter and backoff keys and refreshes their gauges.
    pub fn sweep_limits(&self) {
        let keys = self.limit_store.sweep() + self.global.sweep();
        self.metrics.limit_keys.set(keys as i64);
        let (_, penalized) = self.backoff.sweep();
        self.metrics.backoff_active.set(penalized as i64);
    }

    /// The last reload attempt's status.
    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// The generation and text of the rules in force before the current ones, if any.
    pub fn previous_rules(&self) -> Option<(u64, Arc<str>)> {
        self.previous_rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
    fn finish_reload(
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
fn close_reason_for(decider: &Decider) -> Arc<str> {
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
    let mut who = who;
    let mut end = who.len().min(room);
    while !who.is_char_boundary(end) {
        end -= 1;
    }
    who.truncate(end);
    who.push_str(&retry);
    close_reason(&who)
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
        let reason = close_reason_for(&entry.decider);
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
