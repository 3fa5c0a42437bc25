//! The admission service on hyper's path: one call per HTTP request on a device connection,
//! forwarded to the backend (or upgraded to a tunnel) once admitted.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::registry::CloseSignal;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::admission::{admit, Admission, Admitted, RequestHead};
use super::forward::{
    rewrite_request_headers, strip_hop_by_hop, wants_upgrade, UpstreamRequestBody, UpstreamStream,
};
use super::outcome::{backend_answered, backend_failed, Exchange, OpenTunnel};
use super::response::{ProxyFailure, ResponseBody};
use super::tunnel::{self, TunnelStats};
use super::ConnInfo;
use crate::gate::Gate;
use crate::limits::ConnPermit;
use crate::registry::TrackedKind;

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
    let done = Exchange::new(&gate, admitted, method, path, status, started, backend_time).holding(
        lease,
        registration,
        bytes_in,
    );
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, Some(Box::new(done)), close),
    )
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
