//! The HTTP/1.1 fast path for plain-TCP device connections: WebSocket handshakes and bodiless
//! requests decided, forwarded and relayed without hyper.
//!
//! Through hyper, one exchange runs two HTTP state machines (server and client), a task and a
//! dispatch channel per backend connection and, for a handshake, hyper's upgrade hand-over on
//! both legs: over half of fwgate's instructions per request (bench/README.md). Here the head
//! is read into one buffer and parsed with httparse (the parser hyper uses), decided by the
//! same [`service::admit`] as hyper's path, rewritten into one write to a backend connection
//! (pooled, or new for an upgrade), and the backend's head is parsed the same way. The body is
//! relayed as the backend framed it (length, chunked or until close), byte for byte; on 101
//! both sockets are joined in a tunnel task.
//!
//! The path takes only what it fully understands: an HTTP/1.1 request in origin form with no
//! body and no `Expect`. From the first request that is anything else (a body, HTTP/1.0, a
//! malformed or oversize head, an absolute URI) hyper serves the connection, with the bytes
//! already read handed to it first ([`Prefixed`]), so it answers exactly as it would have from
//! the start (400, 431, bodies, keep-alive). Nothing is decided twice: the hand-over happens
//! before any decision on that request. `[listen] fast_path = false` sends everything through
//! hyper.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use super::forward::{
    is_connection_option, push_forwarded, push_x_forwarded_for, UpstreamStream, HOP_BY_HOP,
};
use super::response::{Answer, BodyDone, ProxyFailure, ResponseBody, TEXT_PLAIN};
use super::service::{self, Admitted, Exchange, OpenTunnel, RequestHead};
use super::{tunnel, ConnInfo};
use crate::extract::{is_visible_ascii, visible_ascii};
use crate::gate::Gate;
use crate::limits::ConnPermit;
use crate::metrics::{CloseReason, UpstreamOutcome};

/// Header slots parsed on the stack. A head with more goes to hyper, which applies
/// `[listen] max_headers` itself.
const REQUEST_HEADER_SLOTS: usize = 64;
/// hyper's client accepts 100 response headers; so does this path.
const RESPONSE_HEADER_SLOTS: usize = 100;
/// First read buffer: a device's handshake head is a few hundred bytes.
const HEAD_BUFFER: usize = 2048;
/// Longest backend response head accepted before answering 502: hyper's client limit, so a
/// backend's head is accepted by both paths alike.
const MAX_RESPONSE_HEAD: usize = 8192 + 4096 * 100;
/// Buffer for relaying a (non-101) response body to an upgrade request.
const BODY_BUFFER: usize = 8 * 1024;

/// What a connection task holds only while it handles HTTP: its place among
/// `max_open_connections` and the shutdown wait. Released when a tunnel starts, as hyper's
/// path does (tunnels outlive the drain and are closed by policy or idleness).
pub(super) struct ConnGuards {
    /// Dropped when the connection stops doing HTTP (shutdown waits for all of them).
    pub _alive: mpsc::Sender<()>,
    /// The `max_open_connections` slot.
    pub _socket: OwnedSemaphorePermit,
}

/// What to do with a complete request head.
enum Step {
    /// hyper serves the connection from this request on.
    Fallback,
    /// Answer with these bytes (a refusal) and go on with the next request unless `close`.
    Respond {
        consumed: usize,
        bytes: Vec<u8>,
        close: bool,
    },
    /// Forward an admitted upgrade.
    Upgrade(Box<ForwardPlan>),
    /// Forward an admitted plain request (no body).
    Request(Box<ForwardPlan>),
}

/// An admitted request, ready to go to the backend.
struct ForwardPlan {
    /// Length of the request head in the read buffer.
    consumed: usize,
    /// The request head as the backend gets it.
    upstream_head: Vec<u8>,
    admitted: Admitted,
    method: http::Method,
    path: Arc<str>,
    /// The client asked to close after this exchange.
    close: bool,
}

/// Serves one plain-TCP device connection: handshakes and bodiless requests here, and from the
/// first request this path does not take, everything through hyper.
pub(super) async fn serve(
    gate: Arc<Gate>,
    mut stream: TcpStream,
    info: ConnInfo,
    slot: ConnPermit,
    mut stop: watch::Receiver<bool>,
    guards: ConnGuards,
) -> Option<super::Tunnel> {
    let slot = Arc::new(slot);
    let mut buf = vec![0u8; HEAD_BUFFER];
    let mut filled = 0;
    loop {
        let step = match next_step(
            &gate,
            &info,
            &slot,
            &stream,
            &mut buf,
            &mut filled,
            &mut stop,
        )
        .await
        {
            Some(step) => step,
            None => return None,
        };
        let (consumed, close) = match step {
            Step::Fallback => break,
            Step::Respond {
                consumed,
                bytes,
                close,
            } => {
                if stream.write_all(&bytes).await.is_err() {
                    gate.metrics.connection_closed(CloseReason::io);
                    return None;
                }
                (consumed, close)
            }
            Step::Upgrade(plan) => {
                let consumed = plan.consumed;
                let close = plan.close;
                let early = &buf[consumed..filled];
                match Box::pin(forward_upgrade(&gate, stream, early, plan)).await {
                    Forwarded::Tunnel(tunnel) => {
                        // The connection is a tunnel now: the task goes on with the tunnel
                        // alone, and this connection's HTTP state is freed.
                        drop(guards);
                        return Some(tunnel);
                    }
                    Forwarded::Answered(kept) => {
                        stream = kept;
                        (consumed, close)
                    }
                    Forwarded::Ended => return None,
                }
            }
            Step::Request(plan) => {
                let consumed = plan.consumed;
                match Box::pin(forward_request(&gate, &mut stream, plan)).await {
                    Some(close) => (consumed, close),
                    None => return None,
                }
            }
        };
        if close {
            let _ = stream.shutdown().await;
            return None;
        }
        // Keep what the client sent after this request (pipelining) for the next round.
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
    // hyper takes over from the start of the current request.
    buf.truncate(filled);
    let io = TokioIo::new(Prefixed::new(buf, stream));
    // Boxed when reached: inline, hyper's connection would size every fast-path connection's
    // future (held by each idle keep-alive connection) by its own.
    Box::pin(super::serve_http(gate, io, info, slot, stop)).await;
    drop(guards);
    None
}

/// Reads until the buffer holds a complete head (or a reason to stop), bounded by
/// `header_read_timeout` from the end of the previous exchange. None: the connection is over
/// (closed by the client, timed out, shutting down while idle, or a socket error).
async fn next_step(
    gate: &Gate,
    info: &ConnInfo,
    slot: &Arc<ConnPermit>,
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    filled: &mut usize,
    stop: &mut watch::Receiver<bool>,
) -> Option<Step> {
    let listen = &gate.config.listen;
    let deadline = tokio::time::Instant::now() + listen.header_read_timeout;
    // Bytes left from the previous request (pipelining) may hold a whole head.
    let mut line_ended = *filled > 0;
    loop {
        if *filled > 0 {
            // Parsed again only once a line has ended: a head trickling in byte by byte costs
            // one parse per line, not one per byte.
            if line_ended {
                if let Some(step) = prepare(gate, info, slot, &buf[..*filled], *stop.borrow()) {
                    return Some(step);
                }
            }
            if *filled == buf.len() {
                // Grows up to the limit; a head that does not fit by then goes to hyper (431).
                let grown = (buf.len() * 2).min(listen.max_header_bytes.max(HEAD_BUFFER));
                if grown <= buf.len() {
                    return Some(Step::Fallback);
                }
                buf.resize(grown, 0);
            }
        }
        let idle = *filled == 0;
        let read = tokio::select! {
            biased;
            r = tokio::time::timeout_at(deadline, read_some(stream, &mut buf[*filled..])) => r,
            // Shutting down: an idle keep-alive connection closes now; one mid-head finishes
            // its request first.
            _ = stop.wait_for(|s| *s), if idle => return None,
        };
        match read {
            Ok(Ok(0)) => {
                if !idle {
                    gate.metrics.connection_closed(CloseReason::io);
                }
                return None;
            }
            Ok(Ok(n)) => {
                line_ended = buf[*filled..*filled + n].contains(&b'\n');
                *filled += n;
            }
            Ok(Err(_)) => {
                gate.metrics.connection_closed(CloseReason::io);
                return None;
            }
            Err(_) => {
                gate.metrics.connection_closed(CloseReason::header_timeout);
                return None;
            }
        }
    }
}

/// One read into `buf` once the socket is readable; readiness is cleared after a short read.
async fn read_some(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
        match tunnel::read_drained(stream, || &mut *buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Parses the buffered head and, when it is one this path takes, decides it; None while the
/// head is incomplete. Synchronous: the parsed headers borrow the buffer and live on the
/// stack, never in the task's future.
fn prepare(
    gate: &Gate,
    info: &ConnInfo,
    slot: &Arc<ConnPermit>,
    bytes: &[u8],
    draining: bool,
) -> Option<Step> {
    let listen = &gate.config.listen;
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); REQUEST_HEADER_SLOTS];
    let mut req = httparse::Request::new(&mut []);
    let limit = listen.max_headers.min(REQUEST_HEADER_SLOTS);
    let consumed = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        bytes,
        &mut slots[..limit],
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if bytes.len() < listen.max_header_bytes => return None,
        // Malformed, too many headers or too large: hyper answers it as it always has.
        _ => return Some(Step::Fallback),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Some(Step::Fallback);
    };
    // Origin form only; the same URI parser as hyper, so rules see the same path.
    if !target.starts_with('/') {
        return Some(Step::Fallback);
    }
    let Ok(target) = http::uri::PathAndQuery::try_from(target) else {
        return Some(Step::Fallback);
    };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return Some(Step::Fallback);
    };
    let headers: &[httparse::Header<'_>] = req.headers;
    let Some(shape) = RequestShape::of(headers) else {
        return Some(Step::Fallback);
    };
    let upgrade = shape.upgrade.filter(|_| shape.connection_upgrade);
    let close = shape.close || draining;
    let head = RequestHead {
        headers,
        method: method.as_str(),
        path: target.path(),
        query: target.query(),
        target_len: target.as_str().len(),
    };
    let admitted = match service::admit(gate, info, slot, &head) {
        service::Admission::Admit(admitted) => admitted,
        service::Admission::Refuse(refusal) => {
            return Some(Step::Respond {
                consumed,
                bytes: encode_answer(&refusal, close),
                close,
            })
        }
    };
    let upstream_head = upstream_request_head(
        &method,
        target.as_str(),
        headers,
        &shape,
        upgrade,
        gate.upstream.authority(),
        info,
    );
    let plan = Box::new(ForwardPlan {
        consumed,
        upstream_head,
        admitted,
        method,
        path: Arc::from(target.path()),
        close,
    });
    Some(match upgrade {
        Some(_) => Step::Upgrade(plan),
        None => Step::Request(plan),
    })
}

/// The request headers this path cares about, found in one pass.
struct RequestShape<'b> {
    /// The first `Upgrade` value.
    upgrade: Option<&'b [u8]>,
    /// `Connection` lists `upgrade`.
    connection_upgrade: bool,
    /// `Connection` lists `close`.
    close: bool,
    /// `Connection` names other headers (to drop as hop-by-hop).
    lists_names: bool,
    has_host: bool,
}

impl<'b> RequestShape<'b> {
    /// None when the request has (or may have) a body, or expects `100 Continue`: hyper's
    /// path handles those.
    fn of(headers: &[httparse::Header<'b>]) -> Option<RequestShape<'b>> {
        let mut shape = RequestShape {
            upgrade: None,
            connection_upgrade: false,
            close: false,
            lists_names: false,
            has_host: false,
        };
        let mut content_length_seen = false;
        for h in headers {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                if content_length_seen || h.value != b"0" {
                    return None;
                }
                content_length_seen = true;
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("expect")
            {
                return None;
            } else if name.eq_ignore_ascii_case("upgrade") {
                shape.upgrade.get_or_insert(h.value);
            } else if name.eq_ignore_ascii_case("connection") {
                for token in tokens(h.value) {
                    if token.eq_ignore_ascii_case(b"upgrade") {
                        shape.connection_upgrade = true;
                    } else if token.eq_ignore_ascii_case(b"close") {
                        shape.close = true;
                    } else if !is_connection_option(token) {
                        shape.lists_names = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("host") {
                shape.has_host = true;
            }
        }
        Some(shape)
    }
}

/// The comma-separated tokens of a header value (none if it is not visible ASCII). Bytes, not
/// `str`: every caller compares them with ASCII names, which needs no UTF-8 check.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let value = if is_visible_ascii(value) { value } else { &[] };
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), dropped on both legs. Most names are ruled out by
/// their length alone.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(name.len(), 2 | 7 | 10 | 16 | 17)
        && HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Headers fwgate writes itself for the backend (`X-Forwarded-For`, `Forwarded`,
/// `X-Forwarded-Proto`): the client's are replaced. Ruled out by length first, as above.
fn is_forwarding(name: &str) -> bool {
    match name.len() {
        9 => name.eq_ignore_ascii_case("forwarded"),
        15 => name.eq_ignore_ascii_case("x-forwarded-for"),
        17 => name.eq_ignore_ascii_case("x-forwarded-proto"),
        _ => false,
    }
}

/// Whether `name` is listed in a `Connection` header, as hyper's path treats it.
fn listed_in_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| tokens(h.value))
        .filter(|t| !is_connection_option(t))
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

/// The request head for the backend: the same rewrite as hyper's path (hop-by-hop removed,
/// `Upgrade` kept with `Connection: upgrade`, `Host` kept or set to the backend's address,
/// `X-Forwarded-For`/`Forwarded` appended, `X-Forwarded-Proto` set), in one buffer.
fn upstream_request_head(
    method: &http::Method,
    target: &str,
    headers: &[httparse::Header<'_>],
    shape: &RequestShape<'_>,
    upgrade: Option<&[u8]>,
    authority: &[u8],
    info: &ConnInfo,
) -> Vec<u8> {
    let lists_names = shape.lists_names;
    let mut out = Vec::with_capacity(
        256 + headers
            .iter()
            .map(|h| h.name.len() + h.value.len() + 4)
            .sum::<usize>(),
    );
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in headers {
        let name = h.name;
        if is_hop_by_hop(name)
            || is_forwarding(name)
            || (lists_names && listed_in_connection(headers, name))
        {
            continue;
        }
        push_header(&mut out, name.as_bytes(), h.value);
    }
    if !shape.has_host {
        push_header(&mut out, b"host", authority);
    }
    if let Some(upgrade) = upgrade {
        push_header(&mut out, b"upgrade", upgrade);
        push_header(&mut out, b"connection", b"upgrade");
    }
    // Written straight into the head: no intermediate strings.
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    out.extend_from_slice(b"x-forwarded-for: ");
    push_x_forwarded_for(&mut out, named("x-forwarded-for"), info.client);
    out.extend_from_slice(b"\r\nforwarded: ");
    let host = named("host").next();
    push_forwarded(&mut out, named("forwarded"), host, info.client, info.scheme);
    out.extend_from_slice(b"\r\n");
    push_header(&mut out, b"x-forwarded-proto", info.scheme.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How an upgrade exchange ended for the connection.
enum Forwarded {
    /// The backend switched protocols: run this to the tunnel's end.
    Tunnel(super::Tunnel),
    /// fwgate answered (a backend failure); the connection can take another request.
    Answered(TcpStream),
    /// The connection is finished (the backend's non-101 answer was relayed, or a write failed).
    Ended,
}

/// Sends an admitted upgrade to a new backend connection and relays the answer: on 101, the
/// tunnel to run; otherwise the backend's response (then the connection closes, as the request
/// asked to leave HTTP) or fwgate's 502/503/504.
async fn forward_upgrade(
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
    gate.metrics.upstream(UpstreamOutcome::ok).inc();
    let backend_time = started.elapsed();
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
                tunnel::relay_tcp(&client, &client_early, &tcp, &upstream_early, &close, idle).await
            }
            tls => {
                let relay =
                    tunnel::relay_generic(client, &client_early, tls, &upstream_early, close, idle);
                Box::pin(relay).await
            }
        };
        tunnel.finish(stats);
    }))
}

/// Forwards an admitted plain request (no body) on a pooled or new backend connection and
/// relays the response. Some(close) when the client connection can go on (close: it should
/// close now), None when it is broken (a response cut short).
async fn forward_request(
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
    gate.metrics.upstream(UpstreamOutcome::ok).inc();
    let backend_time = started.elapsed();
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
    let resp = service::backend_failed(
        gate,
        &admitted.presented,
        &admitted.rule,
        failure,
        method.as_str(),
        path,
        started,
    );
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

/// A backend response head, rewritten for the client.
struct BackendHead {
    status: u16,
    /// The head as the client gets it.
    client_head: Vec<u8>,
    framing: Framing,
    /// Bytes the backend sent after its head.
    rest: Vec<u8>,
    /// The backend keeps the connection open after this response.
    backend_keep_alive: bool,
    /// The client connection closes after this response (it said `Connection: close`, or
    /// the body ends only when the backend closes).
    client_close: bool,
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (101, 204, 304, a response to HEAD).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked: relayed as is, its end found by [`ChunkedEnd`].
    Chunked,
    /// Until the backend closes.
    UntilClose,
}

/// Reads the backend's response head, skipping informational (1xx other than 101) ones as
/// hyper's client does.
async fn read_response_head(
    upstream: &mut UpstreamStream,
    upgrade: bool,
    head_request: bool,
    client_close: bool,
) -> Result<BackendHead, HeadError> {
    let mut buf = vec![0u8; 1024];
    let mut filled = 0;
    let mut received = false;
    loop {
        if filled > 0 {
            match parse_response_head(&buf[..filled], upgrade, head_request, client_close)
                .map_err(HeadError::Failed)?
            {
                ResponseParse::Partial => {}
                ResponseParse::Informational(n) => {
                    buf.copy_within(n..filled, 0);
                    filled -= n;
                    continue;
                }
                ResponseParse::Complete(n, status, client_head, framing, keep_alive) => {
                    return Ok(BackendHead {
                        status,
                        client_head,
                        framing,
                        rest: buf[n..filled].to_vec(),
                        backend_keep_alive: keep_alive,
                        client_close: status != 101
                            && (client_close || framing == Framing::UntilClose),
                    })
                }
            }
            if filled == buf.len() {
                if buf.len() >= MAX_RESPONSE_HEAD {
                    return Err(HeadError::Failed(ProxyFailure::UpstreamBroken));
                }
                buf.resize((buf.len() * 2).min(MAX_RESPONSE_HEAD), 0);
            }
        }
        match upstream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) if !received => return Err(HeadError::Silent),
            Ok(0) | Err(_) => return Err(HeadError::Failed(ProxyFailure::UpstreamBroken)),
            Ok(n) => {
                filled += n;
                received = true;
            }
        }
    }
}

/// Why no response head arrived.
enum HeadError {
    /// The connection ended before any byte of a response: a pooled connection the backend
    /// had closed, safe to retry elsewhere for an idempotent request.
    Silent,
    /// Anything else.
    Failed(ProxyFailure),
}

impl From<HeadError> for ProxyFailure {
    fn from(e: HeadError) -> ProxyFailure {
        match e {
            HeadError::Silent => ProxyFailure::UpstreamBroken,
            HeadError::Failed(f) => f,
        }
    }
}

enum ResponseParse {
    Partial,
    /// An informational head of this length, to skip.
    Informational(usize),
    /// Head length, status, the head for the client, the body's framing, and whether the
    /// backend keeps the connection open after it.
    Complete(usize, u16, Vec<u8>, Framing, bool),
}

/// Parses a response head and rewrites it for the client: hop-by-hop headers removed (the
/// framing header kept when the body is relayed chunked), `Upgrade`/`Connection: upgrade`
/// kept on a 101, `Date` added when missing, `Connection: close` when this path closes after.
fn parse_response_head(
    bytes: &[u8],
    upgrade: bool,
    head_request: bool,
    client_close: bool,
) -> Result<ResponseParse, ProxyFailure> {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); RESPONSE_HEADER_SLOTS];
    let mut resp = httparse::Response::new(&mut []);
    let n = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, bytes, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(ResponseParse::Partial),
        Err(_) => return Err(ProxyFailure::UpstreamBroken),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(ProxyFailure::UpstreamBroken);
    };
    if status == 101 && !upgrade {
        return Err(ProxyFailure::UpstreamBroken);
    }
    if (100..200).contains(&status) && status != 101 {
        return Ok(ResponseParse::Informational(n));
    }
    let headers: &[httparse::Header<'_>] = resp.headers;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut has_date = false;
    let mut backend_close = version == 0;
    let mut lists_names = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides; several headers read as one list.
            transfer_encoding = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for value in visible_ascii(h.value).unwrap_or("x").split(',') {
                let len = value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| ProxyFailure::UpstreamBroken)?;
                if content_length.is_some_and(|l| l != len) {
                    return Err(ProxyFailure::UpstreamBroken);
                }
                content_length = Some(len);
            }
        } else if h.name.eq_ignore_ascii_case("date") {
            has_date = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    backend_close = true;
                } else if !is_connection_option(token) {
                    lists_names = true;
                }
            }
        }
    }
    let framing = if status == 101 || head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if let Some(te) = transfer_encoding {
        match tokens(te).last() {
            Some(last) if last.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::UntilClose,
        }
    } else if let Some(len) = content_length {
        Framing::Length(len)
    } else {
        Framing::UntilClose
    };
    let mut out = Vec::with_capacity(n + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    let reason = resp.reason.filter(|r| !r.is_empty()).or_else(|| {
        StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
    });
    out.extend_from_slice(reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut upgrade_value = None;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_value.get_or_insert(h.value);
        }
        let keep_framing =
            framing == Framing::Chunked && name.eq_ignore_ascii_case("transfer-encoding");
        if (is_hop_by_hop(name) && !keep_framing)
            || (transfer_encoding.is_some() && name.eq_ignore_ascii_case("content-length"))
            || (lists_names && listed_in_connection(headers, name))
        {
            continue;
        }
        push_header(&mut out, name.as_bytes(), h.value);
    }
    if !has_date {
        push_date(&mut out);
    }
    if status == 101 {
        if let Some(u) = upgrade_value {
            push_header(&mut out, b"upgrade", u);
        }
        push_header(&mut out, b"connection", b"upgrade");
    } else if client_close || framing == Framing::UntilClose {
        push_header(&mut out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    let keep_alive = !backend_close && framing != Framing::UntilClose;
    Ok(ResponseParse::Complete(n, status, out, framing, keep_alive))
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

/// Serialises a response fwgate itself made (a backend failure; always a fixed body) the way
/// hyper's server writes it.
fn encode_response(resp: &Response<ResponseBody>, close: bool) -> Vec<u8> {
    let body = resp.body().fixed_bytes().unwrap_or_default();
    let mut out = Vec::with_capacity(160 + body.len());
    push_status_line(&mut out, resp.status());
    for (name, value) in resp.headers() {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    finish_fixed(&mut out, body, close);
    out
}

/// Serialises fwgate's own answer (a refusal) as hyper's path sends it, without building a
/// `Response`: a refusal storm costs as little as possible.
fn encode_answer(answer: &Answer, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + answer.body.len());
    push_status_line(&mut out, answer.status);
    push_header(&mut out, b"content-type", TEXT_PLAIN.as_bytes());
    if let Some(secs) = answer.retry_after {
        let mut digits = itoa::Buffer::new();
        push_header(&mut out, b"retry-after", digits.format(secs).as_bytes());
    }
    finish_fixed(&mut out, &answer.body, close);
    out
}

fn push_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The end of a fixed-body response: length, `Connection: close` when closing, `Date`, the
/// blank line and the body.
fn finish_fixed(out: &mut Vec<u8>, body: &[u8], close: bool) {
    push_header(
        out,
        b"content-length",
        itoa::Buffer::new().format(body.len()).as_bytes(),
    );
    if close {
        push_header(out, b"connection", b"close");
    }
    push_date(out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Appends `date: <IMF-fixdate>`, formatted once per second per thread (as hyper caches it).
fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        push_header(out, b"date", cached.1.as_bytes());
    });
}

/// Finds where a chunked body ends (after the last chunk and the trailers) without decoding
/// it, so the body is relayed byte for byte and the connection's next message is not touched.
#[derive(Debug, Default)]
pub(super) struct ChunkedEnd {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the chunk size's hex digits.
    #[default]
    Size,
    /// After the size: extensions or whitespace up to the line end.
    Extension,
    /// Expecting the LF of the size line.
    SizeLf,
    /// Inside chunk data (`size` bytes left).
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    TrailerLine,
    /// Expecting the final LF.
    EndLf,
    /// The body has ended.
    Done,
}

impl ChunkedEnd {
    /// Feeds the next bytes of the body: `Ok(Some(n))` when the body ends after `n` of them,
    /// `Ok(None)` when all of them belong to it and more follow, `Err` when it is malformed.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // At most 16 hex digits: the size fits a u64.
                        if self.digits == 16 {
                            return Err(());
                        }
                        let digit = (b as char).to_digit(16).ok_or(())?;
                        self.size = self.size * 16 + u64::from(digit);
                        self.digits += 1;
                    }
                    _ if self.digits == 0 => return Err(()),
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.end_of_size_line(),
                    b';' | b' ' | b'\t' => self.state = ChunkState::Extension,
                    _ => return Err(()),
                },
                ChunkState::Extension => match b {
                    b'\r' => self.state = ChunkState::SizeLf,
                    b'\n' => self.end_of_size_line(),
                    _ => {}
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.end_of_size_line();
                }
                ChunkState::Data => {
                    let available = (bytes.len() - i) as u64;
                    let n = available.min(self.size);
                    self.size -= n;
                    i += n as usize;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => self.state = ChunkState::DataLf,
                    b'\n' => self.next_chunk(),
                    _ => return Err(()),
                },
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.next_chunk();
                }
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::EndLf,
                    b'\n' => {
                        self.state = ChunkState::Done;
                        return Ok(Some(i + 1));
                    }
                    _ => self.state = ChunkState::TrailerLine,
                },
                ChunkState::TrailerLine => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err(());
                    }
                    self.state = ChunkState::Done;
                    return Ok(Some(i + 1));
                }
                ChunkState::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == ChunkState::Done).then_some(bytes.len()))
    }

    fn end_of_size_line(&mut self) {
        self.state = if self.size == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        };
    }

    fn next_chunk(&mut self) {
        self.state = ChunkState::Size;
        self.size = 0;
        self.digits = 0;
    }
}

/// A stream whose first reads return bytes already read from it: how a connection this path
/// started reading is handed to hyper intact. The prefix is freed once consumed.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    consumed: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Reads return `prefix` first, then `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            consumed: 0,
            inner,
        }
    }

    /// The stream and the prefix bytes not yet read.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        let mut prefix = self.prefix;
        prefix.drain(..self.consumed);
        (self.inner, prefix)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.consumed < this.prefix.len() {
            let left = &this.prefix[this.consumed..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.consumed += n;
            if this.consumed == this.prefix.len() {
                this.prefix = Vec::new();
                this.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKED: &[u8] =
        b"5;name=v\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n";

    #[test]
    fn header_name_checks_find_every_listed_name_in_any_case_and_nothing_else() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
            assert!(is_hop_by_hop(&name.to_ascii_uppercase()), "{name}");
            assert!(!is_forwarding(name), "{name}");
        }
        for name in ["forwarded", "X-Forwarded-For", "x-forwarded-PROTO"] {
            assert!(is_forwarding(name), "{name}");
            assert!(!is_hop_by_hop(name), "{name}");
        }
        for name in [
            "host",
            "x-device-id",
            "te2",
            "upgrades",
            "connections",
            "x-forwarded",
        ] {
            assert!(!is_hop_by_hop(name) && !is_forwarding(name), "{name}");
        }
    }

    #[test]
    fn chunked_end_is_found_at_every_split_and_not_before() {
        let mut next = CHUNKED.to_vec();
        next.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..=next.len() {
            let mut end = ChunkedEnd::default();
            let (a, b) = next.split_at(split);
            let found = match end.feed(a).unwrap() {
                Some(n) => n,
                None => a.len() + end.feed(b).unwrap().expect("end not found"),
            };
            assert_eq!(found, CHUNKED.len(), "split at {split}");
        }
        // Byte by byte: nothing before the last byte says it ended.
        let mut end = ChunkedEnd::default();
        for (i, b) in CHUNKED.iter().enumerate() {
            let r = end.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(r.is_some(), i == CHUNKED.len() - 1, "at byte {i}");
        }
    }

    #[test]
    fn chunked_accepts_bare_lf_and_no_trailers() {
        let mut end = ChunkedEnd::default();
        assert_eq!(end.feed(b"3\nabc\n0\n\nrest").unwrap(), Some(9));
        let mut end = ChunkedEnd::default();
        assert_eq!(end.feed(b"0\r\n\r\n").unwrap(), Some(5));
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"5\r\nhelloX",
            b"5\rX",
            b"11111111111111111\r\n",
            b"0\r\n\rX",
        ] {
            assert!(ChunkedEnd::default().feed(bad).is_err(), "{bad:?}");
        }
    }

    fn complete(bytes: &[u8], upgrade: bool, head: bool) -> (usize, u16, String, Framing) {
        match parse_response_head(bytes, upgrade, head, true) {
            Ok(ResponseParse::Complete(n, s, h, f, _)) => (n, s, String::from_utf8(h).unwrap(), f),
            other => panic!("not complete: {:?}", other.is_ok()),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |r: &[u8]| complete(r, true, false).3;
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            Framing::Length(12)
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n"),
            Framing::Length(7)
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Framing::UntilClose
        );
        assert_eq!(f(b"HTTP/1.1 200 OK\r\n\r\n"), Framing::UntilClose);
        assert_eq!(
            f(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(f(b"HTTP/1.1 304 Not Modified\r\n\r\n"), Framing::Empty);
        assert_eq!(
            f(b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(
            complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, true).3,
            Framing::Empty
        );
        // Chunked keeps its framing header and drops a contradicting length.
        let (_, _, head, _) = complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            true,
            false,
        );
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
        assert!(!head.contains("Content-Length"), "{head}");
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
    }

    #[test]
    fn bad_or_unexpected_backend_heads_are_502s_and_1xx_are_skipped() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_response_head(bad, true, false, true),
                    Err(ProxyFailure::UpstreamBroken)
                ),
                "{bad:?}"
            );
        }
        // A 101 nobody asked for.
        assert!(parse_response_head(b"HTTP/1.1 101 S\r\n\r\n", false, false, true).is_err());
        assert!(matches!(
            parse_response_head(
                b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1",
                true,
                false,
                true
            ),
            Ok(ResponseParse::Informational(37))
        ));
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nA: b", true, false, true),
            Ok(ResponseParse::Partial)
        ));
    }

    #[test]
    fn a_101_keeps_upgrade_and_the_reason_phrase_survives() {
        let input: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade, X-Hop\r\nX-Hop: 1\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: abc\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\n\r\nDATA";
        let (n, status, head, _) = complete(input, true, false);
        assert_eq!((n, status), (input.len() - 4, 101));
        assert_eq!(
            head,
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        );
        let (_, _, head, _) = complete(b"HTTP/1.1 418 \r\nContent-Length: 0\r\n\r\n", true, false);
        assert!(head.starts_with("HTTP/1.1 418 I'm a teapot\r\n"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
    }

    #[test]
    fn own_responses_are_written_as_hyper_writes_them() {
        let resp = super::super::response::plain(StatusCode::BAD_GATEWAY, "backend unreachable\n");
        let text = String::from_utf8(encode_response(&resp, true)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "backend unreachable\n");
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("HTTP/1.1 502 Bad Gateway"));
        let mut rest: Vec<&str> = lines.filter(|l| !l.starts_with("date: ")).collect();
        rest.sort();
        assert_eq!(
            rest,
            [
                "connection: close",
                "content-length: 20",
                "content-type: text/plain; charset=utf-8"
            ]
        );
        assert!(head.contains("\r\ndate: "));
    }

    #[tokio::test]
    async fn prefixed_reads_the_prefix_first_then_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut small = [0u8; 3];
        p.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hel");
        let (inner, left) = Prefixed::new(b"hello".to_vec(), tokio::io::empty()).into_parts();
        let _ = inner;
        assert_eq!(left, b"hello");
        let mut rest = Vec::new();
        p.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"lo world");
        assert!(p.prefix.capacity() == 0, "the prefix is freed once read");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A chunked body from chunk sizes, extensions and trailers, as a backend would send it.
        fn chunked_body(chunks: &[(usize, bool)], trailers: &[String], bare_lf: bool) -> Vec<u8> {
            let eol: &[u8] = if bare_lf { b"\n" } else { b"\r\n" };
            let mut out = Vec::new();
            for (i, (len, ext)) in chunks.iter().enumerate() {
                out.extend_from_slice(format!("{len:X}").as_bytes());
                if *ext {
                    out.extend_from_slice(b";k=v");
                }
                out.extend_from_slice(eol);
                out.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, *len));
                out.extend_from_slice(eol);
            }
            out.extend_from_slice(b"0");
            out.extend_from_slice(eol);
            for t in trailers {
                out.extend_from_slice(format!("X-{t}: {t}").as_bytes());
                out.extend_from_slice(eol);
            }
            out.extend_from_slice(eol);
            out
        }

        proptest! {
            #[test]
            fn chunked_end_is_exact_however_the_body_is_cut(
                chunks in proptest::collection::vec((1usize..300, any::<bool>()), 0..6),
                trailers in proptest::collection::vec("[a-z]{1,8}", 0..3),
                bare_lf in any::<bool>(),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
                tail in proptest::collection::vec(any::<u8>(), 0..20),
            ) {
                let body = chunked_body(&chunks, &trailers, bare_lf);
                let mut stream = body.clone();
                stream.extend_from_slice(&tail);
                let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                points.push(stream.len());
                points.sort_unstable();
                let mut end = ChunkedEnd::default();
                let (mut at, mut found) = (0, None);
                for p in points {
                    if found.is_some() || p < at {
                        continue;
                    }
                    if let Some(n) = end.feed(&stream[at..p]).unwrap() {
                        found = Some(at + n);
                    }
                    at = p;
                }
                prop_assert_eq!(found, Some(body.len()));
            }

            #[test]
            fn arbitrary_bytes_never_panic_the_parsers(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                let _ = ChunkedEnd::default().feed(&bytes);
                for (upgrade, head, close) in [(true, false, true), (false, true, false)] {
                    let _ = parse_response_head(&bytes, upgrade, head, close);
                }
                let mut prefixed = b"HTTP/1.1 200 OK\r\n".to_vec();
                prefixed.extend_from_slice(&bytes);
                let _ = parse_response_head(&prefixed, false, false, false);
            }

            #[test]
            fn a_forwarded_response_head_reparses_with_the_same_status_and_framing(
                status in 200u16..600,
                length in proptest::option::of(0u64..100_000),
                chunked in any::<bool>(),
                extra in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,20}"), 0..6),
            ) {
                let mut head = format!("HTTP/1.1 {status} X\r\n");
                if let Some(l) = length {
                    head.push_str(&format!("Content-Length: {l}\r\n"));
                }
                if chunked {
                    head.push_str("Transfer-Encoding: chunked\r\n");
                }
                for (k, v) in &extra {
                    head.push_str(&format!("{k}: {}\r\n", v.trim()));
                }
                head.push_str("\r\n");
                let first = parse_response_head(head.as_bytes(), false, false, false);
                let Ok(ResponseParse::Complete(_, s1, out, f1, _)) = first else {
                    // Only a random header colliding with framing can make it unusable.
                    return Ok(());
                };
                let Ok(ResponseParse::Complete(n2, s2, _, f2, _)) =
                    parse_response_head(&out, false, false, false)
                else {
                    return Err(TestCaseError::fail(format!("rewritten head does not parse: {:?}", String::from_utf8_lossy(&out))));
                };
                prop_assert_eq!(n2, out.len());
                prop_assert_eq!((s1, f1), (s2, f2));
            }
        }
    }
}
