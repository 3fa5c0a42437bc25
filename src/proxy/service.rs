//! The admission service: one call per HTTP request on a device connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::registry::CloseSignal;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;

use super::forward::{
    rewrite_request_headers, strip_hop_by_hop, wants_upgrade, Lease, UpstreamRequestBody,
    UpstreamStream,
};
use super::response::{self, BodyDone, ProxyFailure, ResponseBody};
use super::tunnel::{self, TunnelEnd, TunnelStats};
use super::{in_networks, ConnInfo};
use crate::census::{BackendResult, Outcome};
use crate::extract::Extracted;
use crate::extract::MAX_DEVICE_ID_LEN;
use crate::gate::Gate;
use crate::gate::Verdict;
use crate::limits::ConnPermit;
use crate::logging::{millis, seconds};
use crate::metrics::RuleHealth;
use crate::metrics::{BackoffKeyLabel, CloseReason, DecisionKind, UpstreamOutcome};
use crate::registry::TrackedKind;
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
    fn version_str(&self) -> String {
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

/// The backend answered (a response head or 101) `took` after admission: counted for the
/// census (per version) and the admitting rule. Both HTTP paths call this where the answer
/// arrives.
pub(super) fn backend_answered(gate: &Gate, admitted: &Admitted, took: Duration) {
    gate.metrics.upstream(UpstreamOutcome::ok).inc();
    gate.census
        .record_backend(&admitted.presented.version, took, BackendResult::Answered);
    if let Some(health) = &admitted.health {
        health.backend_seconds.observe(took.as_secs_f64());
    }
}

/// Handles one request: decide, then refuse or forward. Never fails: every outcome is a
/// response.
pub async fn handle(
    gate: Arc<Gate>,
    conn: Arc<ConnInfo>,
    connection_slot: Arc<ConnPermit>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    // Rules decide on the normalised path, and the backend gets that same path.
    let (admitted, normalized) = {
        let path = crate::path::normalize(req.uri().path());
        let head = RequestHead {
            headers: req.headers(),
            method: req.method().as_str(),
            path: &path,
            query: req.uri().query(),
            target_len: req.uri().path_and_query().map_or(0, |p| p.as_str().len()),
            connection_may_name_headers: true,
        };
        let admitted = admit(&gate, &conn, &connection_slot, &head);
        let normalized = match path {
            std::borrow::Cow::Owned(p) => Some(p),
            std::borrow::Cow::Borrowed(_) => None,
        };
        (admitted, normalized)
    };
    match admitted {
        Admission::Admit(admitted) => {
            let mut req = req;
            if let Some(path) = normalized {
                set_path(&mut req, &path);
            }
            Ok(forward(gate.clone(), &conn, admitted, req).await)
        }
        Admission::Refuse(answer) => Ok(answer.into_response()),
    }
}

/// Replaces the request's path (keeping its query): the backend gets the path the rules saw.
fn set_path(req: &mut Request<Incoming>, path: &str) {
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(p) = http::uri::PathAndQuery::try_from(target) {
        parts.path_and_query = Some(p);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
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

/// Forwards an admitted request; for an upgrade, relays the 101 and starts the tunnel.
async fn forward(
    gate: Arc<Gate>,
    conn: &ConnInfo,
    admitted: Admitted,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    // HTTP/1.0 has no Upgrade (RFC 9110 §7.8): such a request is forwarded as a plain one.
    let upgrade = req.version() == http::Version::HTTP_11 && wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let path: Arc<str> = req.uri().path().into();
    let method = req.method().clone();
    // The backend leg is HTTP/1.1 whatever the client spoke.
    *req.version_mut() = http::Version::HTTP_11;
    let authority = req.uri().authority().cloned();
    rewrite_request_headers(
        req.headers_mut(),
        upgrade,
        authority.as_ref(),
        conn.client,
        conn.scheme,
    );

    let bytes_in = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let body_timeout = gate.config.listen.body_read_timeout;
    let req = req.map(|body| UpstreamRequestBody::new(body, bytes_in.clone(), body_timeout));
    // Plain requests are tracked too (upgrades register once the tunnel exists), so that a rule
    // change or kill-switch entry with close_existing also ends long requests it now refuses.
    let started = Instant::now();
    let tracked = (!upgrade).then(|| {
        gate.registry.register(
            TrackedKind::Request,
            admitted.presented.version,
            path.clone(),
            admitted.rule.clone(),
            started,
        )
    });
    let sent = async {
        match &tracked {
            Some((_, close)) => tokio::select! {
                r = gate.upstream.send(req, upgrade) => r,
                _ = close.closed() => Err(ProxyFailure::ClosedByPolicy),
            },
            None => gate.upstream.send(req, upgrade).await,
        }
    };
    let (mut resp, lease) = match sent.await {
        Ok(r) => r,
        Err(failure) => {
            return backend_failed(&gate, &admitted, failure, method.as_str(), &path, started)
        }
    };
    let backend_time = started.elapsed();
    backend_answered(&gate, &admitted, backend_time);

    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, resp.status())
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let protocol = tunnel::Protocol::of_upgrade(
            resp.headers()
                .get(http::header::UPGRADE)
                .map(|v| v.as_bytes()),
        );
        let idle = gate.config.listen.tunnel_idle_timeout;
        let tunnel = OpenTunnel::open(gate, admitted, path, started, backend_time);
        tokio::spawn(async move {
            let stats = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((c, u)) => relay(c, u, tunnel.close_signal(), protocol, idle).await,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade did not complete");
                    TunnelStats::default()
                }
            };
            tunnel.finish(stats);
        });
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        return Response::from_parts(parts, ResponseBody::empty());
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    if upgrade {
        // The request asked to leave HTTP and the backend declined: the connection closes
        // after this answer, as on the fast path.
        parts.headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    let (registration, close) = match tracked {
        Some((r, c)) => (Some(r), Some(c)),
        None => (None, None),
    };
    let status = parts.status.as_u16();
    let done = Exchange {
        lease: Some(lease),
        _registration: registration,
        bytes_in: Some(bytes_in),
        ..Exchange::new(&gate, admitted, method, path, status, started, backend_time)
    };
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, Some(Box::new(done)), close),
    )
}

/// An admitted upgrade whose backend said 101: registered (so policy can close it) and
/// counted as active until [`OpenTunnel::finish`].
pub(super) struct OpenTunnel {
    pub gate: Arc<Gate>,
    admitted: Admitted,
    path: Arc<str>,
    started: Instant,
    backend_time: Duration,
    registration: crate::registry::Registration,
    close: Arc<CloseSignal>,
}

impl OpenTunnel {
    /// Registers the tunnel with the connection registry and counts it active.
    pub fn open(
        gate: Arc<Gate>,
        admitted: Admitted,
        path: Arc<str>,
        started: Instant,
        backend_time: Duration,
    ) -> OpenTunnel {
        let (registration, close) = gate.registry.register(
            TrackedKind::Tunnel,
            admitted.presented.version,
            path.clone(),
            admitted.rule.clone(),
            started,
        );
        admitted.active.inc();
        OpenTunnel {
            gate,
            admitted,
            path,
            started,
            backend_time,
            registration,
            close,
        }
    }

    /// The handle the registry notifies to close this tunnel by policy; the relay watches it.
    pub fn close_signal(&self) -> Arc<CloseSignal> {
        self.close.clone()
    }

    /// Ends the tunnel once its relay has: un-counts it, feeds the reconnect backoff (a storm
    /// is many disconnects) and writes the access log. Synchronous, so that the caller's
    /// future holds the relay's state once, not also a copy moved into this one.
    pub fn finish(self, stats: TunnelStats) {
        let OpenTunnel {
            gate,
            admitted,
            path,
            started,
            backend_time,
            registration,
            close: _,
        } = self;
        drop(registration);
        let Admitted {
            presented,
            rule,
            active,
            backoff_key,
            health,
            held,
        } = admitted;
        drop(held);
        active.dec();
        gate.metrics
            .tunnels_closed
            .get_or_create(&crate::metrics::TunnelEndLabel {
                end: stats.end.as_str(),
            })
            .inc();
        let codes = [
            stats.device_close_code,
            stats.backend_close_sent.then_some(tunnel::GOING_AWAY),
        ];
        for code in codes.into_iter().flatten() {
            gate.metrics
                .websocket_close_frames
                .get_or_create(&crate::metrics::CloseFrameLabel {
                    code: crate::metrics::close_code_label(code),
                })
                .inc();
        }
        let lifetime = started.elapsed().saturating_sub(backend_time);
        // Churn is a tunnel that ended on its own soon after it opened; a long-lived tunnel
        // ending is health, and closes fwgate caused never count against the device.
        let on_its_own = matches!(stats.end, TunnelEnd::Closed | TunnelEnd::Error);
        let short = on_its_own && gate.backoff.is_short(lifetime);
        if let (Some(key), true) = (backoff_key, short) {
            gate.backoff.record(key);
        }
        gate.census
            .record_tunnel_end(&presented.version, lifetime, short);
        if let Some(health) = &health {
            health.tunnel_seconds.observe(lifetime.as_secs_f64());
            if short {
                health.short_tunnels.inc();
            }
        }
        if gate.config.log.access {
            tracing::info!(target: "fwgate::access", client = %presented.client, device = presented.device.as_deref().unwrap_or("-"), raw_version = presented.raw_version.as_deref().unwrap_or("-"), version = %presented.version_str(), rule = %rule, decision = "allow", status = 101, path = &*path, backend_ms = millis(backend_time), bytes_in = stats.client_to_upstream, bytes_out = stats.upstream_to_client, end = stats.end.as_str(), duration_s = seconds(started.elapsed()), "tunnel closed");
        }
    }
}

/// Counts and logs a request whose backend exchange failed; the response says why.
pub(super) fn backend_failed(
    gate: &Gate,
    admitted: &Admitted,
    failure: ProxyFailure,
    method: &str,
    path: &str,
    started: Instant,
) -> Response<ResponseBody> {
    match failure {
        ProxyFailure::ClientBodyMalformed => {
            gate.metrics.connection_closed(CloseReason::bad_request)
        }
        ProxyFailure::ClientBodyTimeout => {
            gate.metrics.connection_closed(CloseReason::body_timeout)
        }
        _ => {
            gate.metrics.upstream(outcome_of(failure)).inc();
        }
    }
    let (presented, rule) = (&admitted.presented, &admitted.rule);
    let result = match failure {
        ProxyFailure::UpstreamUnreachable | ProxyFailure::UpstreamBroken => {
            Some(BackendResult::Error)
        }
        ProxyFailure::UpstreamConnectTimeout | ProxyFailure::UpstreamResponseTimeout => {
            Some(BackendResult::Timeout)
        }
        // fwgate's own refusals and the client's faults, not the backend's doing.
        _ => None,
    };
    if let Some(result) = result {
        gate.census
            .record_backend(&presented.version, started.elapsed(), result);
        if let Some(health) = &admitted.health {
            health.backend_failures.inc();
        }
    }
    let (status, _) = failure.status_and_body();
    if gate.config.log.access {
        tracing::warn!(target: "fwgate::access", client = %presented.client, device = presented.device.as_deref().unwrap_or("-"), version = %presented.version_str(), rule = %rule, decision = "allow", status = status.as_u16(), method = method, path = path, backend_ms = millis(started.elapsed()), "backend failed");
    }
    response::failure(failure)
}

fn outcome_of(f: ProxyFailure) -> UpstreamOutcome {
    match f {
        ProxyFailure::UpstreamUnreachable => UpstreamOutcome::connect_error,
        ProxyFailure::UpstreamConnectTimeout => UpstreamOutcome::connect_timeout,
        ProxyFailure::UpstreamResponseTimeout => UpstreamOutcome::response_timeout,
        ProxyFailure::UpstreamBroken => UpstreamOutcome::error,
        ProxyFailure::UpstreamBusy => UpstreamOutcome::busy,
        ProxyFailure::ClosedByPolicy => UpstreamOutcome::closed_by_policy,
        // Counted as client errors by the caller; never reached.
        ProxyFailure::ClientBodyMalformed | ProxyFailure::ClientBodyTimeout => {
            UpstreamOutcome::error
        }
    }
}

/// Joins the two upgraded connections. Plain TCP on both sides (the normal case) uses the
/// socket-readiness relay; anything else (TLS on a leg) takes the generic relay.
///
/// hyper hands back the bytes it read past the HTTP head as a slice of its own read buffer
/// (8 KiB or more); holding that slice for the tunnel's lifetime would pin the whole buffer on
/// both legs of every idle tunnel. So the (normally empty) early bytes are copied out and
/// hyper's buffers are dropped before relaying.
async fn relay(
    client: Upgraded,
    upstream: Upgraded,
    close: Arc<CloseSignal>,
    protocol: tunnel::Protocol,
    idle: Duration,
) -> TunnelStats {
    let plain = client
        .downcast::<TokioIo<TcpStream>>()
        .map(|parts| (parts.io.into_inner(), parts.read_buf.to_vec()))
        .or_else(|client| {
            // A plain connection the fast path handed to hyper: what hyper read past the head,
            // then what the fast path had read and hyper had not reached yet.
            client
                .downcast::<TokioIo<super::prefixed::Prefixed<TcpStream>>>()
                .map(|parts| {
                    let (io, unread) = parts.io.into_inner().into_parts();
                    let mut early = parts.read_buf.to_vec();
                    early.extend_from_slice(&unread);
                    (io, early)
                })
        });
    let (client_io, client_early) = match plain {
        Ok(plain) => plain,
        Err(client) => {
            return Box::pin(tunnel::relay_generic(
                TokioIo::new(client),
                &[],
                TokioIo::new(upstream),
                &[],
                close,
                protocol,
                idle,
            ))
            .await
        }
    };
    match upstream.downcast::<TokioIo<UpstreamStream>>() {
        Ok(parts) => {
            let upstream_early = parts.read_buf.to_vec();
            let io = parts.io.into_inner();
            drop(parts.read_buf);
            match io {
                UpstreamStream::Plain(tcp) => {
                    tunnel::relay_tcp(
                        &client_io,
                        &client_early,
                        &tcp,
                        &upstream_early,
                        &close,
                        protocol,
                        idle,
                    )
                    .await
                }
                tls => {
                    Box::pin(tunnel::relay_generic(
                        client_io,
                        &client_early,
                        tls,
                        &upstream_early,
                        close,
                        protocol,
                        idle,
                    ))
                    .await
                }
            }
        }
        Err(upstream) => {
            Box::pin(tunnel::relay_generic(
                client_io,
                &client_early,
                TokioIo::new(upstream),
                &[],
                close,
                protocol,
                idle,
            ))
            .await
        }
    }
}

/// One forwarded exchange, logged and un-counted when its response body ends.
pub(super) struct Exchange {
    _held: Held,
    /// The backend connection, reused only if the response was read to its end.
    lease: Option<Lease>,
    _registration: Option<crate::registry::Registration>,
    /// Request body bytes sent on (None: the request had no body).
    bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    presented: Presented,
    rule: Arc<str>,
    method: http::Method,
    path: Arc<str>,
    status: u16,
    started: Instant,
    backend_time: std::time::Duration,
    active: Gauge,
    log: bool,
}

impl Exchange {
    /// An exchange whose response head arrived: it holds the request's slots and counts it
    /// active until [`BodyDone::done`]. The fast path relays the body itself; hyper's path
    /// also gives it the backend lease, the registration and the request-body count.
    pub(super) fn new(
        gate: &Gate,
        admitted: Admitted,
        method: http::Method,
        path: Arc<str>,
        status: u16,
        started: Instant,
        backend_time: Duration,
    ) -> Exchange {
        admitted.active.inc();
        Exchange {
            _held: admitted.held,
            lease: None,
            _registration: None,
            bytes_in: None,
            presented: admitted.presented,
            rule: admitted.rule,
            method,
            path,
            status,
            started,
            backend_time,
            active: admitted.active,
            log: gate.config.log.access,
        }
    }
}

impl BodyDone for Exchange {
    fn done(mut self: Box<Self>, bytes: u64, complete: bool) {
        self.active.dec();
        if let (true, Some(lease)) = (complete, self.lease.take()) {
            lease.release();
        }
        if self.log {
            let p = &self.presented;
            tracing::info!(target: "fwgate::access", client = %p.client, device = p.device.as_deref().unwrap_or("-"), raw_version = p.raw_version.as_deref().unwrap_or("-"), version = %p.version_str(), rule = %self.rule, decision = "allow", status = self.status, method = %self.method, path = &*self.path, backend_ms = millis(self.backend_time), bytes_in = self.bytes_in.as_ref().map_or(0, |b| b.load(std::sync::atomic::Ordering::Relaxed)), bytes_out = bytes, complete, duration_ms = millis(self.started.elapsed()), "forwarded");
        }
    }
}
