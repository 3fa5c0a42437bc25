//! Admission: who is asking, what they presented, and the decision on it (forward with the
//! request's slots taken, or the refusal), shared by hyper's path and the fast path.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use prometheus_client::metrics::gauge::Gauge;

use super::response::{self};
use super::{in_networks, ConnInfo};
use crate::census::Outcome;
use crate::extract::Extracted;
use crate::extract::MAX_DEVICE_ID_LEN;
use crate::gate::Gate;
use crate::gate::Verdict;
use crate::limits::ConnPermit;
use crate::metrics::RuleHealth;
use crate::metrics::{BackoffKeyLabel, DecisionKind};
use crate::rules::{jittered_wait_secs, DecidedBy, VersionInput};

const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// Who is asking and what they presented, kept for the access log.
pub(super) struct Presented {
    pub client: SocketAddr,
    pub device: Option<String>,
    pub raw_version: Option<String>,
    pub version: VersionInput,
}

impl Presented {
    pub(super) fn version_str(&self) -> String {
        match &self.version {
            VersionInput::Parsed(v) => v.to_string(),
            VersionInput::Missing => "missing".into(),
            VersionInput::Unparseable => "unparseable".into(),
        }
    }
}

/// What admission needs from a request head, whichever parser read it.
pub(super) struct RequestHead<'a, H: ?Sized> {
    /// The headers (hyper's map or the fast path's parsed slice).
    pub headers: &'a H,
    /// The method, for the access log.
    pub method: &'a str,
    /// The path (no query), for rules and logs.
    pub path: &'a str,
    /// The query string, for query-parameter sources.
    pub query: Option<&'a str>,
    /// Length of the request target, checked against `max_uri_bytes`.
    pub target_len: usize,
    /// Whether `Connection` may name other headers (false when the parser already saw it
    /// holds only options such as `upgrade`): only then is it checked against the sources.
    pub connection_may_name_headers: bool,
}

/// An admitted request: what forwarding it needs and the slots it holds while open.
pub(super) struct Admitted {
    pub presented: Presented,
    pub rule: Arc<str>,
    pub active: Gauge,
    /// The reconnect backoff's key for this device, when it is tracked.
    pub backoff_key: Option<u64>,
    /// The admitting rule's backend-health metrics.
    pub health: Option<Arc<RuleHealth>>,
    pub held: Held,
}

/// What [`admit`] decided.
// Returned once per request and matched at once: boxing `Admitted` would cost an allocation
// per admitted request to save a copy of ~270 bytes.
#[allow(clippy::large_enum_variant)]
pub(super) enum Admission {
    /// Forward it, with its slots taken.
    Admit(Admitted),
    /// Answer with this refusal.
    Refuse(response::Answer),
}

/// Decides one request: forward it (with its slots taken) or the response that refuses it. Order (cheapest refusal first): per-IP rate, reconnect backoff, kill switch
/// and rules (with a `limit` rule's limiter), global handshake rate, backend capacity.
pub(super) fn admit<H: crate::extract::HeaderSource + ?Sized>(
    gate: &Gate,
    conn: &ConnInfo,
    connection_slot: &Arc<ConnPermit>,
    req: &RequestHead<'_, H>,
) -> Admission {
    let listen = &gate.config.listen;
    if req.target_len > listen.max_uri_bytes {
        return Admission::Refuse(response::Answer::plain(
            StatusCode::URI_TOO_LONG,
            "request target too long\n",
        ));
    }
    let client = effective_client(conn, req.headers, &listen.trusted_forwarders);
    let ip = client.ip();
    let deciders = &gate.limit_deciders;
    if !gate.global.per_ip_ok(ip) {
        let verdict = gate.refuse_by(&deciders.per_ip, None);
        let refused = Refused::new(verdict, &deciders.per_ip);
        return Admission::Refuse(refuse(gate, refused, None, req, client));
    }
    let snap = gate.snapshot();
    let rules = &snap.rules;
    let (headers, query) = (req.headers, req.query);
    let cert = conn.cert_identity.as_deref();
    let ordering = rules.ordering;
    let found = match rules
        .version_sources
        .extract(headers, query, cert, ordering)
    {
        Extracted::Ambiguous(why) => {
            let what = format!("firmware version: {}", rules.version_sources.explain(why));
            return Admission::Refuse(refuse_ambiguous(gate, what, req, client));
        }
        extracted => extracted.found().copied(),
    };
    let device = match rules.device_sources.extract(headers, query, cert, ordering) {
        Extracted::Ambiguous(why) => {
            let what = format!("device id: {}", rules.device_sources.explain(why));
            return Admission::Refuse(refuse_ambiguous(gate, what, req, client));
        }
        extracted => extracted.found().copied(),
    };
    if let Some(name) = req
        .connection_may_name_headers
        .then(|| rules.source_header_in_connection(headers))
        .flatten()
    {
        let what = format!("Connection names {name}, which fwgate decides on: it would be removed before the backend sees it");
        return Admission::Refuse(refuse_ambiguous(gate, what, req, client));
    }
    let device_raw = device.as_ref().map(|d| d.raw);
    let version = VersionInput::from_found(found.as_ref(), ordering);
    // Only the access log reads these: no display strings when it is off.
    let presented = || {
        gate.config.log.access.then(|| Presented {
            client,
            device: device.map(|d| d.display(MAX_DEVICE_ID_LEN)),
            raw_version: found.map(|f| f.display(crate::version::MAX_VERSION_LEN)),
            version,
        })
    };

    let backoff_key = gate.backoff.key(device_raw, ip);
    if let Some(remaining) = backoff_key.and_then(|key| gate.backoff.penalty(key)) {
        gate.census.record(&version, Outcome::HeldBack);
        let key_kind = gate.backoff.config().key.as_str();
        gate.metrics
            .backoff_held_back
            .get_or_create(&BackoffKeyLabel { key: key_kind })
            .inc();
        if let Some(held) = gate.backoff.note_held_back() {
            tracing::warn!(
                held,
                key = key_kind,
                "reconnect backoff is holding back devices that reconnect too often ({held} refused since the last warning; see fwgate_backoff_held_back_total and /v1/versions)"
            );
        }
        let verdict = gate.refuse_by(&deciders.backoff, Some(jittered_wait_secs(remaining, 0.25)));
        let refused = Refused::new(verdict, &deciders.backoff).held_by(key_kind);
        return Admission::Refuse(refuse(gate, refused, presented(), req, client));
    }

    let decision = gate.decide(&snap, &version, req.path);
    let mut verdict = gate.apply(&decision, device_raw, ip);
    let mut decider = decision.decider;
    if matches!(verdict, Verdict::Forward(_)) && !gate.global.handshake_ok() {
        verdict = gate.refuse_by(&deciders.handshake_rate, None);
        decider = &deciders.handshake_rate;
    }
    let permit = match verdict {
        Verdict::Forward(permit) => permit,
        refused => {
            if let Some(key) = backoff_key {
                gate.backoff.record(key);
            }
            let outcome = match refused {
                _ if decision.by == DecidedBy::KillSwitch => Outcome::KillSwitch,
                Verdict::Refuse(_, _, DecisionKind::deny) => Outcome::Denied,
                _ => Outcome::Limited,
            };
            gate.census.record(&version, outcome);
            let refused = Refused::new(refused, decider);
            return Admission::Refuse(refuse(gate, refused, presented(), req, client));
        }
    };
    let Some(upstream_slot) = gate.upstream_capacity.try_take() else {
        gate.census.record(&version, Outcome::Limited);
        let verdict = gate.refuse_by(&deciders.upstream_capacity, None);
        let refused = Refused::new(verdict, &deciders.upstream_capacity);
        return Admission::Refuse(refuse(gate, refused, presented(), req, client));
    };
    gate.census.record(&version, Outcome::Admitted);
    if let Some(shadow) = decision.shadow {
        if gate.config.log.access {
            tracing::info!(target: "fwgate::access", client = %client, device = device.map(|d| d.display(MAX_DEVICE_ID_LEN)).as_deref().unwrap_or("-"), version = %version_str(&version), shadow_rule = %shadow.name, would = shadow.action.as_str(), "shadow rule matched; admitted anyway");
        }
    }
    // The display strings are for the access log only.
    let log = gate.config.log.access;
    let presented = Presented {
        client,
        device: device.filter(|_| log).map(|d| d.display(MAX_DEVICE_ID_LEN)),
        raw_version: found
            .filter(|_| log)
            .map(|f| f.display(crate::version::MAX_VERSION_LEN)),
        version,
    };
    let held = Held {
        _connection: connection_slot.clone(),
        _limit: permit,
        _upstream: upstream_slot,
        upstream_active: gate.metrics.upstream_active.clone(),
    };
    held.upstream_active.inc();
    Admission::Admit(Admitted {
        presented,
        rule: decision.decider.name.clone(),
        active: decision.decider.counters.active.clone(),
        backoff_key,
        health: decision.decider.health.clone(),
        held,
    })
}

/// The client address used for logs, per-IP limits and the backoff: behind trusted forwarders
/// (the load balancer's networks), the right-most `X-Forwarded-For` entry that is not itself a
/// trusted forwarder, as nginx's `real_ip_recursive` does; otherwise the connection's client.
fn effective_client<H: crate::extract::HeaderSource + ?Sized>(
    conn: &ConnInfo,
    headers: &H,
    trusted: &[ipnet::IpNet],
) -> SocketAddr {
    if trusted.is_empty() || !in_networks(conn.client.ip(), trusted) {
        return conn.client;
    }
    let mut chosen = conn.client;
    let hops = headers
        .values(&X_FORWARDED_FOR)
        .into_iter()
        .filter_map(crate::extract::visible_ascii)
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<std::net::IpAddr>() else {
            break;
        };
        chosen = SocketAddr::new(ip, 0);
        if !in_networks(ip, trusted) {
            break;
        }
    }
    chosen
}

/// Slots an admitted connection holds while it is open (released on drop).
pub(super) struct Held {
    _connection: Arc<ConnPermit>,
    _limit: Option<ConnPermit>,
    _upstream: ConnPermit,
    upstream_active: Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.upstream_active.dec();
    }
}

fn version_str(v: &VersionInput) -> String {
    match v {
        VersionInput::Parsed(v) => v.to_string(),
        VersionInput::Missing => "missing".into(),
        VersionInput::Unparseable => "unparseable".into(),
    }
}

/// A refusal on its way to the device: the verdict, who made it and, for the reconnect
/// backoff, what identified the device.
struct Refused<'a> {
    verdict: Verdict<'a>,
    decider: &'a crate::rules::Decider,
    held_by: Option<&'static str>,
}

impl<'a> Refused<'a> {
    fn new(verdict: Verdict<'a>, decider: &'a crate::rules::Decider) -> Refused<'a> {
        Refused {
            verdict,
            decider,
            held_by: None,
        }
    }

    fn held_by(self, key_kind: &'static str) -> Refused<'a> {
        Refused {
            held_by: Some(key_kind),
            ..self
        }
    }
}

/// Answers 400 to a request whose version or device id is ambiguous, saying why: fwgate
/// never decides on one value while the backend may read another.
fn refuse_ambiguous<H: ?Sized>(
    gate: &Gate,
    what: String,
    req: &RequestHead<'_, H>,
    client: SocketAddr,
) -> response::Answer {
    let decider = &gate.limit_deciders.ambiguous;
    decider.counters.deny.inc();
    gate.census.record_ambiguous();
    if gate.config.log.access && gate.refusal_log.allow() {
        tracing::info!(target: "fwgate::access", client = %client, rule = %decider.name, decision = "deny", status = 400, method = req.method, path = req.path, reason = %what, "refused");
    }
    response::Answer {
        status: StatusCode::BAD_REQUEST,
        body: bytes::Bytes::from(format!("ambiguous request: {what}\n")),
        retry_after: None,
    }
}

/// Builds a refusal answer and logs it (sampled).
fn refuse<H: ?Sized>(
    gate: &Gate,
    refused: Refused<'_>,
    presented: Option<Presented>,
    req: &RequestHead<'_, H>,
    client: SocketAddr,
) -> response::Answer {
    let decider = refused.decider;
    let Verdict::Refuse(refusal, retry, kind) = refused.verdict else {
        return response::Answer::plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
    };
    let answer = response::Answer::refusal(refusal, retry);
    if gate.config.log.access && gate.refusal_log.allow() {
        let p = presented.as_ref();
        tracing::info!(
            target: "fwgate::access",
            client = %client,
            device = p.and_then(|p| p.device.as_deref()).unwrap_or("-"),
            raw_version = p.and_then(|p| p.raw_version.as_deref()).unwrap_or("-"),
            version = %p.map(|p| p.version_str()).unwrap_or_else(|| "-".into()),
            rule = %decider.name,
            decision = kind.as_str(),
            held_by = refused.held_by.unwrap_or("-"),
            status = answer.status.as_u16(),
            method = req.method,
            path = req.path,
            "refused"
        );
    }
    answer
}
