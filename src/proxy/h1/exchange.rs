//! One forwarded exchange on the fast path: an admitted upgrade sent to a new backend
//! connection (then the tunnel, or the backend's answer relayed), or an admitted bodiless
//! request on a pooled connection with its response relayed as the backend framed it.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::super::admission::Admitted;
use super::super::forward::UpstreamStream;
use super::super::outcome::{self, Exchange, OpenTunnel};
use super::super::response::{BodyDone, ProxyFailure};
use super::super::tunnel;
use super::chunked::ChunkedEnd;
use super::encode::encode_response;
use super::response_head::{read_response_head, BackendHead, Framing, HeadError};
use super::ForwardPlan;
use crate::gate::Gate;

/// Buffer for relaying a (non-101) response body to an upgrade request.
const BODY_BUFFER: usize = 8 * 1024;

/// How an upgrade exchange ended for the connection.
pub(super) enum Forwarded {
    /// The backend switched protocols: run this to the tunnel's end.
    Tunnel(super::super::Tunnel),
    /// fwgate answered (a backend failure); the connection can take another request.
    Answered(TcpStream),
    /// The connection is finished (the backend's non-101 answer was relayed, or a write failed).
    Ended,
}

/// Sends an admitted upgrade to a new backend connection and relays the answer: on 101, the
/// tunnel to run; otherwise the backend's response (then the connection closes, as the request
/// asked to leave HTTP) or fwgate's 502/503/504.
pub(super) async fn forward_upgrade(
    gate: &Arc<Gate>,
    mut client: TcpStream,
    early: &[u8],
    plan: Box<ForwardPlan>,
) -> Forwarded {
    let ForwardPlan {
        upstream_head,
        admitted,
        method,
        path,
        close,
        ..
    } = *plan;
    let started = Instant::now();
    let exchange = async {
        let mut upstream = gate.upstream.connect().await?;
        let head = send_on(&mut upstream, &upstream_head, Sent::Upgrade).await?;
        Ok::<_, ProxyFailure>((upstream, head))
    };
    let (mut upstream, head) = match tokio::time::timeout_at(
        deadline(started, gate.upstream.response_timeout()),
        exchange,
    )
    .await
    {
        Ok(Ok(r)) => r,
        failed => {
            let failure = match failed {
                Ok(Err(f)) => f,
                _ => ProxyFailure::UpstreamResponseTimeout,
            };
            let answer = failure_answer(gate, admitted, failure, (&method, &path, started), close);
            return match client.write_all(&answer).await {
                Ok(()) => Forwarded::Answered(client),
                Err(_) => Forwarded::Ended,
            };
        }
    };
    let backend_time = started.elapsed();
    outcome::backend_answered(gate, &admitted, backend_time);
    if head.status != 101 {
        let exchange = Exchange::new(
            gate,
            admitted,
            method,
            path,
            head.status,
            started,
            backend_time,
        );
        let (bytes, complete, _) = relay_response(&mut upstream, &mut client, head).await;
        Box::new(exchange).done(bytes, complete);
        let _ = client.shutdown().await;
        return Forwarded::Ended;
    }
    if client.write_all(&head.client_head).await.is_err() {
        return Forwarded::Ended;
    }
    let client_early = early.to_vec();
    let upstream_early = head.rest;
    let protocol = head.protocol;
    let tunnel = OpenTunnel::open(gate.clone(), admitted, path, started, backend_time);
    let idle = gate.config.listen.tunnel_idle_timeout;
    let close = tunnel.close_signal();
    // The relay is awaited right here (not passed into another async fn, which would hold a
    // second copy of its state), and the rare TLS relay is boxed: what an idle tunnel holds
    // is this block's captures and the plain relay's state. Boxed here, where it is made, so
    // that its state is copied once (into the box), not again on each return on its way up.
    Forwarded::Tunnel(Box::pin(async move {
        let stats = match upstream {
            UpstreamStream::Plain(tcp) => {
                let (early, up_early) = (&client_early, &upstream_early);
                tunnel::relay_tcp(&client, early, &tcp, up_early, &close, protocol, idle).await
            }
            tls => {
                let (early, up_early) = (&client_early, &upstream_early);
                let relay =
                    tunnel::relay_generic(client, early, tls, up_early, close, protocol, idle);
                Box::pin(relay).await
            }
        };
        tunnel.finish(stats);
    }))
}

/// Forwards an admitted plain request (no body) on a pooled or new backend connection and
/// relays the response. Some(close) when the client connection can go on (close: it should
/// close now), None when it is broken (a response cut short).
pub(super) async fn forward_request(
    gate: &Arc<Gate>,
    client: &mut TcpStream,
    plan: Box<ForwardPlan>,
) -> Option<bool> {
    let ForwardPlan {
        upstream_head,
        admitted,
        method,
        path,
        close,
        ..
    } = *plan;
    // Tracked while open, so that a rule change or kill-switch entry with close_existing also
    // ends long requests it now refuses.
    let started = Instant::now();
    let (registration, policy_close) = gate.registry.register(
        crate::registry::TrackedKind::Request,
        admitted.presented.version,
        path.clone(),
        admitted.rule.clone(),
        started,
    );
    let sent_as = Sent::Request {
        head: method == http::Method::HEAD,
        client_close: close,
    };
    // A pooled connection the backend closed meanwhile is noticed when it answers nothing;
    // the request (idempotent: it has no body here) is then sent once more on a new one.
    let exchange = async {
        if let Some(mut upstream) = gate.upstream.take_raw(started) {
            match send_on(&mut upstream, &upstream_head, sent_as).await {
                Ok(head) => return Ok((upstream, head)),
                Err(HeadError::Silent) if method.is_idempotent() => {}
                Err(e) => return Err(ProxyFailure::from(e)),
            }
        }
        let mut upstream = gate.upstream.connect().await?;
        let head = send_on(&mut upstream, &upstream_head, sent_as).await?;
        Ok((upstream, head))
    };
    let timed = tokio::time::timeout_at(
        deadline(started, gate.upstream.response_timeout()),
        exchange,
    );
    let sent = tokio::select! {
        r = timed => r.unwrap_or(Err(ProxyFailure::UpstreamResponseTimeout)),
        _ = policy_close.closed() => Err(ProxyFailure::ClosedByPolicy),
    };
    let (mut upstream, head) = match sent {
        Ok(r) => r,
        Err(failure) => {
            drop(registration);
            let answer = failure_answer(gate, admitted, failure, (&method, &path, started), close);
            return client.write_all(&answer).await.ok().map(|()| close);
        }
    };
    let backend_time = started.elapsed();
    outcome::backend_answered(gate, &admitted, backend_time);
    let exchange = Exchange::new(
        gate,
        admitted,
        method,
        path,
        head.status,
        started,
        backend_time,
    );
    let (backend_keep_alive, client_close) = (head.backend_keep_alive, head.client_close);
    let (bytes, complete, clean) = tokio::select! {
        r = relay_response(&mut upstream, client, head) => r,
        _ = policy_close.closed() => (0, false, false),
    };
    Box::new(exchange).done(bytes, complete);
    drop(registration);
    if complete && clean && backend_keep_alive {
        // Idle since about when its response arrived: early rather than late, so the pool
        // gives it up before the backend's own keep-alive timeout does.
        gate.upstream.put_raw(upstream, started + backend_time);
    }
    complete.then_some(client_close)
}

/// The response deadline of an exchange that started at `started`: from the clock reading
/// the exchange already made, not a new one.
fn deadline(started: Instant, timeout: std::time::Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(started) + timeout
}

/// fwgate's own answer to a failed backend exchange (method, path, start), counted and logged
/// as hyper's path does, with the request's slots released. Synchronous, so that the callers'
/// futures hold only the encoded bytes while they write them.
fn failure_answer(
    gate: &Gate,
    admitted: Admitted,
    failure: ProxyFailure,
    (method, path, started): (&http::Method, &str, Instant),
    close: bool,
) -> Vec<u8> {
    let resp = outcome::backend_failed(gate, &admitted, failure, method.as_str(), path, started);
    drop(admitted);
    encode_response(&resp, close)
}

/// What was sent to the backend, which decides how its answer is read.
#[derive(Clone, Copy)]
enum Sent {
    /// An upgrade: a 101 is expected; anything else is relayed and the client then closed.
    Upgrade,
    /// A plain request (`HEAD` has no response body; the client may have asked to close).
    Request { head: bool, client_close: bool },
}

/// Writes a request head on a backend connection and reads the response head.
async fn send_on(
    upstream: &mut UpstreamStream,
    request_head: &[u8],
    sent: Sent,
) -> Result<BackendHead, HeadError> {
    if write_request_head(upstream, request_head).await.is_err() {
        return Err(HeadError::Silent);
    }
    match sent {
        Sent::Upgrade => read_response_head(upstream, true, false, true).await,
        Sent::Request { head, client_close } => {
            read_response_head(upstream, false, head, client_close).await
        }
    }
}

/// Writes a request head, straight to the socket first when it is plain TCP: tokio learns
/// that a new socket is writable only from the reactor, which would cost a round through it
/// before the first byte of every handshake. Whatever the socket does not take (or a TLS
/// stream) is written the usual way.
async fn write_request_head(upstream: &mut UpstreamStream, mut head: &[u8]) -> io::Result<()> {
    if let UpstreamStream::Plain(tcp) = upstream {
        head = &head[tunnel::send_now(tcp, head)?..];
    }
    upstream.write_all(head).await
}

/// Relays a backend response (head already rewritten) to the client, as its framing says;
/// returns the body bytes that reached the client, whether the body was complete, and whether
/// the backend sent nothing past it (so its connection can carry another request).
async fn relay_response(
    upstream: &mut UpstreamStream,
    client: &mut TcpStream,
    head: BackendHead,
) -> (u64, bool, bool) {
    let BackendHead {
        client_head,
        framing,
        rest,
        ..
    } = head;
    let mut chunked = ChunkedEnd::default();
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    // Bytes of `chunk` that belong to this response, and whether it ends there.
    let mut take = |chunk: &[u8], remaining: &mut u64| -> Result<(usize, bool), ()> {
        match framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(_) => {
                let n = chunk
                    .len()
                    .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                *remaining -= n as u64;
                Ok((n, *remaining == 0))
            }
            Framing::Chunked => match chunked.feed(chunk)? {
                Some(end) => Ok((end, true)),
                None => Ok((chunk.len(), false)),
            },
            Framing::UntilClose => Ok((chunk.len(), false)),
        }
    };
    let mut sent = 0u64;
    let Ok((n, mut done)) = take(&rest, &mut remaining) else {
        return (0, false, false);
    };
    // Bytes past the end of the response: the backend broke framing, never reuse it.
    let mut clean = n == rest.len();
    let mut first = client_head;
    first.extend_from_slice(&rest[..n]);
    if client.write_all(&first).await.is_err() {
        return (0, false, false);
    }
    sent += n as u64;
    drop(first);
    if done {
        return (sent, true, clean);
    }
    let mut buf = vec![0u8; BODY_BUFFER];
    while !done {
        let read = match upstream.read(&mut buf).await {
            Ok(0) => return (sent, framing == Framing::UntilClose, false),
            Ok(n) => n,
            Err(_) => return (sent, false, false),
        };
        let Ok((n, end)) = take(&buf[..read], &mut remaining) else {
            return (sent, false, false);
        };
        if client.write_all(&buf[..n]).await.is_err() {
            return (sent, false, false);
        }
        sent += n as u64;
        clean = n == read;
        done = end;
    }
    (sent, true, clean)
}
