//! The admission state shared by every connection: the rules in force (swapped atomically on
//! reload), metrics, the connection registry, and the backend client. One `Gate` per process.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::access_log::RefusalSampler;
use crate::audit::AuditTrail;
use crate::census::Census;
use crate::config::Config;
use crate::killswitch::layers::{Layers, SharedLayer};
use crate::killswitch::{self, KillSet};
use crate::limits::backoff::Backoff;
use crate::limits::{key_hash, Capacity, ConnPermit, GlobalLimits, LimitOutcome, LimitStore};
use crate::metrics::{DecisionKind, Metrics};
use crate::proxy::forward::Upstream;
use crate::registry::Registry;
use crate::rules::{
    jittered_wait_secs, Action, DecidedBy, Decider, Decision, Refusal, RuleSet, VersionInput,
};
use crate::shared::SharedStore;
use std::net::IpAddr;

mod kill;
mod reload;
mod shared;

pub use kill::{Impact, KillOutcome, KillTarget};
pub use reload::{ReloadOutcome, ReloadStatus};

/// One consistent view for one decision: the rules and the kill-switch entries in force.
pub struct Snapshot {
    /// Rules in force.
    pub rules: Arc<RuleSet>,
    /// Kill-switch entries in force.
    pub kill: Arc<KillSet>,
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
}
