//! One Prometheus registry for the process. Labels come from closed enums or from names the
//! operator wrote (rule names, kill-switch ids), never from the wire, so cardinality is bounded
//! by the files, not by the fleet. Hot-path counters are resolved once per rule at compile time
//! (see [`RuleCounters`]) so that counting a decision is one atomic add.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What a decision did, as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DecisionKind {
    /// Admitted and forwarded.
    allow,
    /// Refused by a rule, a default or a kill-switch entry.
    deny,
    /// A shadow-mode rule would have refused; admitted anyway.
    shadow_deny,
    /// A shadow-mode rule would have admitted (counted so shadow allow rules are visible too).
    shadow_allow,
    /// Refused by a rate or concurrency limit.
    limited,
}

impl DecisionKind {
    /// Every kind, for dropping all of a rule's series.
    pub const ALL: [DecisionKind; 5] = [
        DecisionKind::allow,
        DecisionKind::deny,
        DecisionKind::shadow_deny,
        DecisionKind::shadow_allow,
        DecisionKind::limited,
    ];

    /// The label value, also used as the access log's `decision` field.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::allow => "allow",
            DecisionKind::deny => "deny",
            DecisionKind::shadow_deny => "shadow_deny",
            DecisionKind::shadow_allow => "shadow_allow",
            DecisionKind::limited => "limited",
        }
    }
}

/// Labels of `fwgate_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// What was decided.
    pub decision: DecisionKind,
    /// Which rule decided: a rule name, `default`, `missing`, `unparseable` or `killswitch:<id>`.
    pub rule: String,
}

/// Labels keyed by rule only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    /// The rule (or reason) name, as in [`DecisionLabels::rule`].
    pub rule: String,
}

/// How a request to the backend ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UpstreamOutcome {
    /// A response head arrived.
    ok,
    /// TCP connect failed (502).
    connect_error,
    /// TCP connect took longer than `connect_timeout` (504).
    connect_timeout,
    /// The response head took longer than `response_timeout` (504).
    response_timeout,
    /// The connection broke during the exchange (502).
    error,
    /// Refused before connecting: too many connects in progress (503).
    busy,
    /// Abandoned because the rules in force no longer admit the request (503).
    closed_by_policy,
}

/// Labels of `fwgate_upstream_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// How the backend exchange ended.
    pub outcome: UpstreamOutcome,
}

/// Result of a rules reload.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    /// New rules in force.
    ok,
    /// The file was invalid; the previous rules stay in force.
    error,
}

/// Labels of `fwgate_rules_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabel {
    /// Whether the reload applied.
    pub result: ReloadResult,
}

/// Kinds of kill-switch change.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum KillSwitchAction {
    /// An entry was added or replaced through the API.
    add,
    /// An entry was removed through the API.
    remove,
    /// The state file changed on disk.
    file,
}

/// Labels of `fwgate_killswitch_changes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KillSwitchLabel {
    /// What changed.
    pub action: KillSwitchAction,
}

/// Which kind of fleet store (the only label of the fleet gauges, so that they exist only in
/// fleet mode).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FleetStoreKind {
    /// etcd v3.
    etcd,
}

/// Labels of the fleet gauges and histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FleetStoreLabel {
    /// The store.
    pub store: FleetStoreKind,
}

const FLEET: FleetStoreLabel = FleetStoreLabel {
    store: FleetStoreKind::etcd,
};

fn propagation_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Why a fleet member's watch on the store was restarted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FleetRestartReason {
    /// A request or the stream failed (store unreachable, refused, token expired).
    error,
    /// The store closed the stream.
    closed,
    /// Nothing arrived for `stall_timeout`.
    stalled,
    /// The resume revision was compacted: the whole state was read again.
    compacted,
}

/// Labels of `fwgate_fleet_watch_restarts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FleetRestartLabel {
    /// Why.
    pub reason: FleetRestartReason,
}

/// Kinds of document refused from the fleet store.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FleetDocKind {
    /// A kill-switch entry.
    killswitch,
    /// The rules document.
    rules,
}

/// Labels of `fwgate_fleet_invalid_documents_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FleetDocLabel {
    /// Which kind.
    pub kind: FleetDocKind,
}

/// Why fwgate closed a connection (or hyper did, on bad input), as a label value.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CloseReason {
    /// PROXY protocol is on and the peer is not a trusted proxy.
    untrusted_proxy,
    /// The PROXY header was missing or malformed.
    bad_proxy_header,
    /// The TLS handshake failed or timed out.
    tls_handshake,
    /// The request head (or PROXY header) did not arrive in time.
    header_timeout,
    /// A keep-alive connection sat idle between requests for `keepalive_timeout`.
    keepalive_timeout,
    /// Malformed HTTP, in the head or the request body (400).
    bad_request,
    /// No request body bytes for `body_read_timeout` (408).
    body_timeout,
    /// Refused at accept: the client address already holds `max_connections_per_ip` (503).
    per_ip_limit,
    /// Request head over `max_header_bytes`/`max_headers` (hyper answered 431).
    head_too_large,
    /// Socket errors.
    io,
}

/// Labels of `fwgate_tunnels_closed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelEndLabel {
    /// How the tunnel ended (`TunnelEnd::as_str`: `closed`, `error`, `idle_timeout`,
    /// `closed_by_policy`, `kill_switch`, `shutdown`).
    pub end: &'static str,
}

/// Labels of `fwgate_websocket_close_frames_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseFrameLabel {
    /// The Close frame's code: `1001` (to a backend), `1008` or `1013` (to a device); see
    /// [`close_code_label`].
    pub code: &'static str,
}

/// The label of a Close frame code fwgate sends (a closed set: anything else is `other`).
pub fn close_code_label(code: u16) -> &'static str {
    match code {
        1001 => "1001",
        1008 => "1008",
        1013 => "1013",
        _ => "other",
    }
}

/// Labels of `fwgate_connections_closed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabel {
    /// Why.
    pub reason: CloseReason,
}

/// Labels of `fwgate_backoff_held_back_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackoffKeyLabel {
    /// What identified the device: `device` (id + address) or `ip`.
    pub key: &'static str,
}

/// Backend health per admitting rule: the per-cohort figures of the census, with labels
/// bounded by the rules file. Created only for deciders that can admit (a refusing rule or
/// kill-switch entry never reaches the backend), so no series is exported that can never move.
#[derive(Debug)]
pub struct RuleHealth {
    /// `fwgate_backend_response_seconds{rule}`: admission to the backend's response head or 101.
    pub backend_seconds: Histogram,
    /// `fwgate_backend_failures_total{rule}`: backend errors and timeouts (502/504).
    pub backend_failures: Counter,
    /// `fwgate_tunnel_duration_seconds{rule}`: how long tunnels lived.
    pub tunnel_seconds: Histogram,
    /// `fwgate_short_tunnels_total{rule}`: tunnels that ended on their own soon after opening.
    pub short_tunnels: Counter,
}

fn backend_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 16)
}

fn tunnel_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.25, 4.0, 10)
}

/// Labels of `fwgate_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    /// The crate version of this binary.
    pub version: String,
}

/// Every metric fwgate exports. Cloning handles is cheap (they are `Arc`s inside).
pub struct Metrics {
    registry: Registry,
    /// Every rule name with series, and whether a decider in force still counts into them.
    rule_series: std::sync::Mutex<HashMap<String, Weak<SeriesInUse>>>,
    /// `fwgate_decisions_total{decision,rule}`.
    pub decisions: Family<DecisionLabels, Counter>,
    /// `fwgate_active_connections{rule}`: open tunnels and in-flight requests per admitting rule.
    pub active_connections: Family<RuleLabel, Gauge>,
    /// `fwgate_upstream_requests_total{outcome}`.
    pub upstream_requests: Family<OutcomeLabel, Counter>,
    /// `fwgate_upstream_connect_seconds`: time to establish TCP connections to the backend.
    pub upstream_connect_seconds: Histogram,
    /// `fwgate_rules_reloads_total{result}`.
    pub rules_reloads: Family<ReloadLabel, Counter>,
    /// `fwgate_rules_generation`: increments with every rule set put in force.
    pub rules_generation: Gauge,
    /// `fwgate_rules_last_reload_success_timestamp_seconds`.
    pub rules_last_reload_success: Gauge<f64, AtomicU64>,
    /// `fwgate_connections_accepted_total`: device TCP connections accepted.
    pub connections_accepted: Counter,
    /// `fwgate_access_log_suppressed_total`: refusal log lines dropped by sampling.
    pub access_log_suppressed: Counter,
    /// `fwgate_tunnels_closed_by_policy_total`: tunnels closed because new rules refuse them.
    pub tunnels_closed_by_policy: Counter,
    /// `fwgate_limit_keys`: keys held by keyed limiters (refreshed every sweep).
    pub limit_keys: Gauge,
    /// `fwgate_backoff_active`: devices/IPs currently held back by the reconnect backoff.
    pub backoff_active: Gauge,
    /// `fwgate_backoff_held_back_total{key}`: requests refused by the reconnect backoff.
    pub backoff_held_back: Family<BackoffKeyLabel, Counter>,
    /// `fwgate_upstream_pending`: backend TCP connects in progress.
    pub upstream_pending: Gauge,
    /// `fwgate_upstream_active`: backend exchanges (in-flight requests + open tunnels).
    pub upstream_active: Gauge,
    /// `fwgate_connections_closed_total{reason}`: connections refused or cut at the connection level.
    pub connections_closed: Family<CloseLabel, Counter>,
    /// `fwgate_tunnels_closed_total{end}`: tunnels ended, by how (a shutdown, a kill-switch
    /// entry and a rule change are told apart).
    pub tunnels_closed: Family<TunnelEndLabel, Counter>,
    /// `fwgate_websocket_close_frames_total{code}`: Close frames fwgate sent when it closed
    /// WebSocket tunnels (to devices 1008/1013, to backends 1001).
    pub websocket_close_frames: Family<CloseFrameLabel, Counter>,
    /// `fwgate_killswitch_changes_total{action}`.
    pub killswitch_changes: Family<KillSwitchLabel, Counter>,
    /// `fwgate_killswitch_entries`: entries in the state in force (including not yet pruned expired ones).
    pub killswitch_entries: Gauge,
    /// `fwgate_killswitch_state_errors_total`: unusable state files (start-up fallback to the backup, bad edits).
    pub killswitch_state_errors: Counter,
    /// `fwgate_backend_response_seconds{rule}` (see [`RuleHealth`]).
    backend_seconds: Family<RuleLabel, Histogram, fn() -> Histogram>,
    /// `fwgate_backend_failures_total{rule}`.
    backend_failures: Family<RuleLabel, Counter>,
    /// `fwgate_tunnel_duration_seconds{rule}`.
    tunnel_seconds: Family<RuleLabel, Histogram, fn() -> Histogram>,
    /// `fwgate_short_tunnels_total{rule}`.
    short_tunnels: Family<RuleLabel, Counter>,
    /// `fwgate_fleet_store_connected{store}`: 1 while the fleet store's watch is established.
    pub fleet_store_connected: Family<FleetStoreLabel, Gauge>,
    /// `fwgate_fleet_applied_revision{store}`: the fleet state revision in force here.
    pub fleet_applied_revision: Family<FleetStoreLabel, Gauge>,
    /// `fwgate_fleet_propagation_seconds{store}`: from a change's write (writer's clock) to its
    /// application here.
    pub fleet_propagation_seconds: Family<FleetStoreLabel, Histogram, fn() -> Histogram>,
    /// `fwgate_fleet_watch_restarts_total{reason}`.
    pub fleet_watch_restarts: Family<FleetRestartLabel, Counter>,
    /// `fwgate_fleet_invalid_documents_total{kind}`: documents refused from the store.
    pub fleet_invalid_documents: Family<FleetDocLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `fwgate_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fwgate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Admission decisions by outcome and deciding rule",
            decisions.clone(),
        );
        let active_connections = Family::<RuleLabel, Gauge>::default();
        registry.register(
            "active_connections",
            "Open tunnels and in-flight requests by the rule that admitted them",
            active_connections.clone(),
        );
        let upstream_requests = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "upstream_requests",
            "Requests forwarded to the backend by outcome",
            upstream_requests.clone(),
        );
        let upstream_connect_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register(
            "upstream_connect_seconds",
            "Time to open a TCP connection to the backend",
            upstream_connect_seconds.clone(),
        );
        let rules_reloads = Family::<ReloadLabel, Counter>::default();
        registry.register(
            "rules_reloads",
            "Rules reload attempts by result",
            rules_reloads.clone(),
        );
        let rules_generation = Gauge::default();
        registry.register(
            "rules_generation",
            "Generation number of the rule set in force",
            rules_generation.clone(),
        );
        let rules_last_reload_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "rules_last_reload_success_timestamp_seconds",
            "Unix time when a rule set was last put in force",
            rules_last_reload_success.clone(),
        );
        let build_info = Family::<BuildLabel, Gauge>::default();
        registry.register("build_info", "Build information", build_info.clone());
        build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        let connections_accepted = Counter::default();
        registry.register(
            "connections_accepted",
            "Device TCP connections accepted",
            connections_accepted.clone(),
        );
        let access_log_suppressed = Counter::default();
        registry.register(
            "access_log_suppressed",
            "Refusal access-log lines dropped by sampling",
            access_log_suppressed.clone(),
        );
        let tunnels_closed_by_policy = Counter::default();
        registry.register(
            "tunnels_closed_by_policy",
            "Open tunnels and in-flight requests closed because rules or kill-switch entries no longer admit them",
            tunnels_closed_by_policy.clone(),
        );
        let killswitch_changes = Family::<KillSwitchLabel, Counter>::default();
        registry.register(
            "killswitch_changes",
            "Kill-switch changes by kind",
            killswitch_changes.clone(),
        );
        let killswitch_entries = Gauge::default();
        registry.register(
            "killswitch_entries",
            "Kill-switch entries in force",
            killswitch_entries.clone(),
        );
        let killswitch_state_errors = Counter::default();
        registry.register(
            "killswitch_state_errors",
            "Unusable kill-switch state files (fell back to the backup or kept the entries in force)",
            killswitch_state_errors.clone(),
        );
        let limit_keys = Gauge::default();
        registry.register(
            "limit_keys",
            "Keys held by keyed rate limiters (per device or IP)",
            limit_keys.clone(),
        );
        let backoff_active = Gauge::default();
        registry.register(
            "backoff_active",
            "Devices or IPs currently held back by the reconnect backoff",
            backoff_active.clone(),
        );
        let backoff_held_back = Family::<BackoffKeyLabel, Counter>::default();
        registry.register(
            "backoff_held_back",
            "Requests refused by the reconnect backoff, by what identified the device",
            backoff_held_back.clone(),
        );
        let upstream_pending = Gauge::default();
        registry.register(
            "upstream_pending",
            "Backend TCP connects in progress",
            upstream_pending.clone(),
        );
        let upstream_active = Gauge::default();
        registry.register(
            "upstream_active",
            "Backend exchanges in progress (requests and tunnels)",
            upstream_active.clone(),
        );
        let connections_closed = Family::<CloseLabel, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections refused or cut at the connection level, by reason",
            connections_closed.clone(),
        );
        let backend_seconds: Family<RuleLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(backend_buckets()));
        registry.register(
            "backend_response_seconds",
            "Time from admission to the backend's response head or 101, by admitting rule",
            backend_seconds.clone(),
        );
        let backend_failures = Family::<RuleLabel, Counter>::default();
        registry.register(
            "backend_failures",
            "Backend errors and timeouts (502/504) by admitting rule",
            backend_failures.clone(),
        );
        let tunnel_seconds: Family<RuleLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(tunnel_buckets()));
        registry.register(
            "tunnel_duration_seconds",
            "How long tunnels lived, by admitting rule",
            tunnel_seconds.clone(),
        );
        let short_tunnels = Family::<RuleLabel, Counter>::default();
        registry.register(
            "short_tunnels",
            "Tunnels that ended on their own soon after opening (the backoff's short_tunnel), by admitting rule",
            short_tunnels.clone(),
        );
        let fleet_store_connected = Family::<FleetStoreLabel, Gauge>::default();
        registry.register(
            "fleet_store_connected",
            "1 while the fleet store's watch is established (fleet mode only)",
            fleet_store_connected.clone(),
        );
        let fleet_applied_revision = Family::<FleetStoreLabel, Gauge>::default();
        registry.register(
            "fleet_applied_revision",
            "Fleet state revision in force on this instance",
            fleet_applied_revision.clone(),
        );
        let fleet_propagation_seconds =
            Family::<FleetStoreLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                propagation_histogram,
            );
        registry.register(
            "fleet_propagation_seconds",
            "Time from a fleet change's write to its application on this instance (writer's clock)",
            fleet_propagation_seconds.clone(),
        );
        let fleet_watch_restarts = Family::<FleetRestartLabel, Counter>::default();
        registry.register(
            "fleet_watch_restarts",
            "Restarts of the watch on the fleet store, by reason",
            fleet_watch_restarts.clone(),
        );
        let fleet_invalid_documents = Family::<FleetDocLabel, Counter>::default();
        registry.register(
            "fleet_invalid_documents",
            "Documents refused from the fleet store (the previous state stays in force)",
            fleet_invalid_documents.clone(),
        );
        let tunnels_closed = Family::<TunnelEndLabel, Counter>::default();
        registry.register(
            "tunnels_closed",
            "Tunnels ended, by how: closed, error, idle_timeout, closed_by_policy, kill_switch, shutdown",
            tunnels_closed.clone(),
        );
        let websocket_close_frames = Family::<CloseFrameLabel, Counter>::default();
        registry.register(
            "websocket_close_frames",
            "Close frames fwgate sent when it closed WebSocket tunnels, by code: 1008 and 1013 to devices, 1001 to backends",
            websocket_close_frames.clone(),
        );
        Metrics {
            websocket_close_frames,
            backend_seconds,
            backend_failures,
            tunnel_seconds,
            short_tunnels,
            registry,
            rule_series: std::sync::Mutex::default(),
            fleet_store_connected,
            fleet_applied_revision,
            fleet_propagation_seconds,
            fleet_watch_restarts,
            fleet_invalid_documents,
            connections_closed,
            tunnels_closed,
            limit_keys,
            backoff_active,
            backoff_held_back,
            upstream_pending,
            upstream_active,
            killswitch_changes,
            killswitch_entries,
            killswitch_state_errors,
            decisions,
            active_connections,
            upstream_requests,
            upstream_connect_seconds,
            rules_reloads,
            rules_generation,
            rules_last_reload_success,
            connections_accepted,
            access_log_suppressed,
            tunnels_closed_by_policy,
        }
    }

    /// Gives subsystems added later (kill switch, limits) a place to register their metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Renders the registry in the OpenMetrics text format that Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The counters and gauge of one decision source, resolved once so counting is one atomic add.
    /// They keep the name's series exported for as long as they live (see
    /// [`Metrics::prune_rule_series`]).
    pub fn rule_counters(&self, rule: &str) -> RuleCounters {
        self.rule_counters_for(rule, &DecisionKind::ALL, true)
    }

    /// A decider's counters, exporting only the series it can move: `kinds` are the decisions
    /// it can make, `admits` whether connections can be open under it. The other counters work
    /// but are never exported, so `/metrics` shows no series that can never be non-zero
    /// (`decision="allow",rule="backoff"`).
    pub fn rule_counters_for(
        &self,
        rule: &str,
        kinds: &[DecisionKind],
        admits: bool,
    ) -> RuleCounters {
        let in_use = {
            let mut names = self.rule_series();
            match names.get(rule).and_then(Weak::upgrade) {
                Some(in_use) => in_use,
                None => {
                    let in_use = Arc::new(SeriesInUse);
                    names.insert(rule.to_string(), Arc::downgrade(&in_use));
                    in_use
                }
            }
        };
        let get = |decision| {
            if !kinds.contains(&decision) {
                return Counter::default();
            }
            self.decisions
                .get_or_create(&DecisionLabels {
                    decision,
                    rule: rule.to_string(),
                })
                .clone()
        };
        RuleCounters {
            allow: get(DecisionKind::allow),
            deny: get(DecisionKind::deny),
            shadow_deny: get(DecisionKind::shadow_deny),
            shadow_allow: get(DecisionKind::shadow_allow),
            limited: get(DecisionKind::limited),
            active: if admits {
                self.active_connections
                    .get_or_create(&RuleLabel {
                        rule: rule.to_string(),
                    })
                    .clone()
            } else {
                Gauge::default()
            },
            _in_use: Some(in_use),
        }
    }

    /// The backend-health series of an admitting rule (see [`RuleHealth`]), resolved once at
    /// compile time like its counters.
    pub fn rule_health(&self, rule: &str) -> Arc<RuleHealth> {
        let label = RuleLabel {
            rule: rule.to_string(),
        };
        Arc::new(RuleHealth {
            backend_seconds: self.backend_seconds.get_or_create(&label).clone(),
            backend_failures: self.backend_failures.get_or_create(&label).clone(),
            tunnel_seconds: self.tunnel_seconds.get_or_create(&label).clone(),
            short_tunnels: self.short_tunnels.get_or_create(&label).clone(),
        })
    }

    fn rule_series(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<SeriesInUse>>> {
        // Only inserts and removes happen under this lock, so a poisoned one is still sound.
        self.rule_series.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops exporting the series of rule names that nothing counts into any more: no decider
    /// in force has them (the rule or kill-switch entry was removed) and no connection it
    /// admitted is still open. Without this, every renamed or deleted rule would leave six
    /// series behind for the life of the process. A name that comes back starts from zero,
    /// which Prometheus reads as a counter reset. Returns how many names were dropped.
    pub fn prune_rule_series(&self) -> usize {
        let mut names = self.rule_series();
        let before = names.len();
        names.retain(|rule, in_use| {
            if in_use.strong_count() > 0 {
                return true;
            }
            let label = RuleLabel { rule: rule.clone() };
            let open = self.active_connections.get(&label).map_or(0, |g| g.get());
            if open != 0 {
                return true;
            }
            self.active_connections.remove(&label);
            self.backend_seconds.remove(&label);
            self.backend_failures.remove(&label);
            self.tunnel_seconds.remove(&label);
            self.short_tunnels.remove(&label);
            for decision in DecisionKind::ALL {
                self.decisions.remove(&DecisionLabels {
                    decision,
                    rule: rule.clone(),
                });
            }
            false
        });
        before - names.len()
    }

    /// Counts a connection-level refusal.
    pub fn connection_closed(&self, reason: CloseReason) {
        self.connections_closed
            .get_or_create(&CloseLabel { reason })
            .inc();
    }

    /// Counts one kill-switch change.
    pub fn killswitch_change(&self, action: KillSwitchAction) {
        self.killswitch_changes
            .get_or_create(&KillSwitchLabel { action })
            .inc();
    }

    /// Sets `fwgate_fleet_store_connected`.
    pub fn fleet_connected(&self, up: bool) {
        self.fleet_store_connected
            .get_or_create(&FLEET)
            .set(i64::from(up));
    }

    /// Sets `fwgate_fleet_applied_revision`.
    pub fn fleet_applied(&self, revision: i64) {
        self.fleet_applied_revision
            .get_or_create(&FLEET)
            .set(revision);
    }

    /// Observes one change's propagation time.
    pub fn fleet_propagation(&self, seconds: f64) {
        self.fleet_propagation_seconds
            .get_or_create(&FLEET)
            .observe(seconds);
    }

    /// Counts a restart of the fleet watch.
    pub fn fleet_watch_restart(&self, reason: FleetRestartReason) {
        self.fleet_watch_restarts
            .get_or_create(&FleetRestartLabel { reason })
            .inc();
    }

    /// Counts a document refused from the fleet store.
    pub fn fleet_invalid_document(&self, kind: FleetDocKind) {
        self.fleet_invalid_documents
            .get_or_create(&FleetDocLabel { kind })
            .inc();
    }

    /// The upstream outcome counter for `outcome`.
    pub fn upstream(&self, outcome: UpstreamOutcome) -> Counter {
        self.upstream_requests
            .get_or_create(&OutcomeLabel { outcome })
            .clone()
    }
}

/// Pre-resolved counters for one rule (or default, or kill-switch entry).
#[derive(Clone, Debug, Default)]
pub struct RuleCounters {
    /// Admissions decided by this rule.
    pub allow: Counter,
    /// Refusals decided by this rule.
    pub deny: Counter,
    /// Shadow refusals (would have refused).
    pub shadow_deny: Counter,
    /// Shadow admissions.
    pub shadow_allow: Counter,
    /// Refusals because a limit was exceeded.
    pub limited: Counter,
    /// Connections open under this rule.
    pub active: Gauge,
    /// Keeps the rule's series exported while any decider holds these counters.
    _in_use: Option<Arc<SeriesInUse>>,
}

/// Held by every [`RuleCounters`] of one rule name; when none is left, the name's series may go.
#[derive(Debug)]
struct SeriesInUse;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_documented_names() {
        let m = Metrics::new();
        m.rule_counters("block").deny.inc();
        m.upstream(UpstreamOutcome::ok).inc();
        let text = m.encode();
        for name in [
            "fwgate_decisions_total{decision=\"deny\",rule=\"block\"} 1",
            "fwgate_active_connections{rule=\"block\"} 0",
            "fwgate_upstream_requests_total{outcome=\"ok\"} 1",
            "fwgate_upstream_connect_seconds_bucket",
            "fwgate_rules_generation",
            "fwgate_rules_last_reload_success_timestamp_seconds",
            "fwgate_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn series_of_rules_no_longer_in_force_go_once_their_connections_close() {
        let m = Metrics::new();
        let kept = m.rule_counters("kept");
        let removed = m.rule_counters("removed");
        removed.deny.inc();
        let open = m.rule_counters("open");
        open.active.inc();
        assert_eq!(m.prune_rule_series(), 0, "every name is still in force");
        drop(removed);
        drop(open);
        assert_eq!(m.prune_rule_series(), 1);
        let text = m.encode();
        assert!(!text.contains("rule=\"removed\""), "{text}");
        assert!(
            text.contains("fwgate_active_connections{rule=\"open\"} 1"),
            "{text}"
        );
        // The connection it admitted closes (admissions hold a clone of the gauge).
        m.active_connections
            .get_or_create(&RuleLabel {
                rule: "open".into(),
            })
            .dec();
        assert_eq!(m.prune_rule_series(), 1);
        let text = m.encode();
        assert!(!text.contains("rule=\"open\""), "{text}");
        assert!(text.contains("rule=\"kept\""), "{text}");
        // A name that comes back is counted again, from zero.
        m.rule_counters("removed").allow.inc();
        assert!(m
            .encode()
            .contains("fwgate_decisions_total{decision=\"allow\",rule=\"removed\"} 1"));
        drop(kept);
    }

    #[test]
    fn counters_for_one_rule_are_shared() {
        let m = Metrics::new();
        let a = m.rule_counters("r");
        let b = m.rule_counters("r");
        a.allow.inc();
        assert_eq!(b.allow.get(), 1);
    }
}
