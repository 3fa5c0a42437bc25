//! What follows an admitted request: the backend's answer or failure recorded (census,
//! per-rule health, metrics, access log), open tunnels and response exchanges accounted
//! until they end. Shared by hyper's path and the fast path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::registry::CloseSignal;
use http::Response;
use prometheus_client::metrics::gauge::Gauge;

use super::admission::{Admitted, Held, Presented};
use super::forward::Lease;
use super::response::{self, BodyDone, ProxyFailure, ResponseBody};
use super::tunnel::{self, TunnelEnd, TunnelStats};
use crate::census::BackendResult;
use crate::gate::Gate;
use crate::logging::{millis, seconds};
use crate::metrics::{CloseReason, UpstreamOutcome};
use crate::registry::TrackedKind;

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

impl Exchange {
    /// On hyper's path the exchange also holds the backend lease (reused only after a
    /// complete response), the registration for close signals, and the request-body count.
    pub(super) fn holding(
        self,
        lease: Lease,
        registration: Option<crate::registry::Registration>,
        bytes_in: Arc<std::sync::atomic::AtomicU64>,
    ) -> Exchange {
        Exchange {
            lease: Some(lease),
            _registration: registration,
            bytes_in: Some(bytes_in),
            ..self
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
