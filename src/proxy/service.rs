//! The admission service: one call per HTTP request on a device connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::forward::{add_forwarding_headers, strip_hop_by_hop, wants_upgrade};
use super::response::{self, BodyDone, ProxyFailure, ResponseBody};
use super::tunnel::{self, TunnelStats};
use crate::extract::MAX_DEVICE_ID_LEN;
use crate::gate::Gate;
use crate::metrics::UpstreamOutcome;
use crate::rules::{Action, Decision, VersionInput};

/// Who is asking and what they presented, kept for the access log.
struct Presented {
    client: SocketAddr,
    device: Option<String>,
    raw_version: Option<String>,
    version: VersionInput,
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

/// Handles one request: decide, then refuse or forward. Never fails: every outcome is a response.
pub async fn handle(
    gate: Arc<Gate>,
    client: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let snap = gate.snapshot();
    let rules = &snap.rules;
    let found = rules
        .version_sources
        .extract(req.headers(), req.uri().query());
    let version = VersionInput::from_found(found.as_ref());
    let decision = gate.decide(&snap, &version, req.uri().path());
    gate.count(&decision);
    gate.census.record(&version);

    let log_this = gate.config.log.access && (decision.admits() || gate.refusal_log.allow());
    let presented = Presented {
        client,
        device: if log_this || decision.admits() {
            rules
                .device_sources
                .extract(req.headers(), req.uri().query())
                .map(|d| d.display(MAX_DEVICE_ID_LEN))
        } else {
            None
        },
        raw_version: if log_this {
            found.map(|f| f.display(crate::version::MAX_VERSION_LEN))
        } else {
            None
        },
        version,
    };

    if let Action::Deny(refusal) = &decision.decider.action {
        if log_this {
            log_refusal(&presented, &decision, refusal.status, &req);
        }
        return Ok(response::refusal(refusal));
    }
    if let Some(shadow) = decision.shadow {
        if gate.config.log.access {
            tracing::info!(target: "fwgate::access", client = %presented.client, device = presented.device.as_deref().unwrap_or("-"), version = %presented.version_str(), shadow_rule = %shadow.name, would = shadow.action.as_str(), "shadow rule matched; admitted anyway");
        }
    }
    Ok(forward(gate.clone(), presented, &decision, req).await)
}

fn log_refusal(p: &Presented, d: &Decision<'_>, status: StatusCode, req: &Request<Incoming>) {
    tracing::info!(
        target: "fwgate::access",
        client = %p.client,
        device = p.device.as_deref().unwrap_or("-"),
        raw_version = p.raw_version.as_deref().unwrap_or("-"),
        version = %p.version_str(),
        rule = %d.decider.name,
        decision = "deny",
        status = status.as_u16(),
        method = %req.method(),
        path = req.uri().path(),
        "refused"
    );
}

/// Forwards an admitted request; for an upgrade, relays the 101 and starts the tunnel.
async fn forward(
    gate: Arc<Gate>,
    presented: Presented,
    decision: &Decision<'_>,
    mut req: Request<Incoming>,
) -> Response<ResponseBody> {
    let upgrade = wants_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let path: Box<str> = req.uri().path().into();
    let method = req.method().clone();
    strip_hop_by_hop(req.headers_mut(), upgrade);
    add_forwarding_headers(req.headers_mut(), presented.client, "http");

    let started = Instant::now();
    let mut resp = match gate.upstream.send(req).await {
        Ok(r) => r,
        Err(failure) => {
            gate.metrics.upstream(outcome_of(failure)).inc();
            let (status, _) = failure.status_and_body();
            if gate.config.log.access {
                tracing::warn!(target: "fwgate::access", client = %presented.client, device = presented.device.as_deref().unwrap_or("-"), version = %presented.version_str(), rule = %decision.decider.name, decision = "allow", status = status.as_u16(), method = %method, path = &*path, backend_ms = started.elapsed().as_secs_f64() * 1000.0, "backend failed");
            }
            return response::failure(failure);
        }
    };
    gate.metrics.upstream(UpstreamOutcome::ok).inc();
    let backend_time = started.elapsed();
    let rule: Arc<str> = decision.decider.name.clone();
    let active = decision.decider.counters.active.clone();

    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, resp.status())
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (registration, close) = gate
            .registry
            .register(presented.version, &path, rule.clone());
        active.inc();
        let log = gate.config.log.access;
        tokio::spawn(async move {
            let _registration = registration;
            let stats = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((c, u)) => relay(c, u, close).await,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade did not complete");
                    TunnelStats::default()
                }
            };
            active.dec();
            if log {
                tracing::info!(target: "fwgate::access", client = %presented.client, device = presented.device.as_deref().unwrap_or("-"), raw_version = presented.raw_version.as_deref().unwrap_or("-"), version = %presented.version_str(), rule = %rule, decision = "allow", status = 101, path = &*path, backend_ms = backend_time.as_secs_f64() * 1000.0, bytes_in = stats.client_to_upstream, bytes_out = stats.upstream_to_client, end = stats.end.as_str(), duration_s = started.elapsed().as_secs_f64(), "tunnel closed");
            }
        });
        let (mut parts, _) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, true);
        return Response::from_parts(parts, ResponseBody::empty());
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    active.inc();
    let done = Exchange {
        presented,
        rule,
        method,
        path,
        status: parts.status.as_u16(),
        started,
        backend_time,
        active,
        log: gate.config.log.access,
    };
    Response::from_parts(parts, ResponseBody::upstream(body, Some(Box::new(done))))
}

fn outcome_of(f: ProxyFailure) -> UpstreamOutcome {
    match f {
        ProxyFailure::UpstreamUnreachable => UpstreamOutcome::connect_error,
        ProxyFailure::UpstreamConnectTimeout => UpstreamOutcome::connect_timeout,
        ProxyFailure::UpstreamResponseTimeout => UpstreamOutcome::response_timeout,
        ProxyFailure::UpstreamBroken => UpstreamOutcome::error,
    }
}

/// Joins the two upgraded connections. Plain TCP on both sides (the normal case) uses the
/// buffer-free idle relay; anything else falls back to a buffered copy.
async fn relay(client: Upgraded, upstream: Upgraded, close: Arc<Notify>) -> TunnelStats {
    let client = match client.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => parts,
        Err(client) => {
            return tunnel::relay_generic(
                TokioIo::new(client),
                &[],
                TokioIo::new(upstream),
                &[],
                close,
            )
            .await
        }
    };
    match upstream.downcast::<TokioIo<TcpStream>>() {
        Ok(up) => {
            tunnel::relay_tcp(
                client.io.into_inner(),
                &client.read_buf,
                up.io.into_inner(),
                &up.read_buf,
                &close,
            )
            .await
        }
        Err(upstream) => {
            tunnel::relay_generic(
                client.io.into_inner(),
                &client.read_buf,
                TokioIo::new(upstream),
                &[],
                close,
            )
            .await
        }
    }
}

/// One forwarded exchange, logged and un-counted when its response body ends.
struct Exchange {
    presented: Presented,
    rule: Arc<str>,
    method: http::Method,
    path: Box<str>,
    status: u16,
    started: Instant,
    backend_time: std::time::Duration,
    active: Gauge,
    log: bool,
}

impl BodyDone for Exchange {
    fn done(self: Box<Self>, bytes: u64, complete: bool) {
        self.active.dec();
        if self.log {
            let p = &self.presented;
            tracing::info!(target: "fwgate::access", client = %p.client, device = p.device.as_deref().unwrap_or("-"), raw_version = p.raw_version.as_deref().unwrap_or("-"), version = %p.version_str(), rule = %self.rule, decision = "allow", status = self.status, method = %self.method, path = &*self.path, backend_ms = self.backend_time.as_secs_f64() * 1000.0, bytes_out = bytes, complete, duration_ms = self.started.elapsed().as_secs_f64() * 1000.0, "forwarded");
        }
    }
}
