//! The HTTP/1.1 fast path for plain-TCP device connections: WebSocket handshakes and bodiless
//! requests decided, forwarded and relayed without hyper.
//!
//! Through hyper, one exchange runs two HTTP state machines (server and client), a task and a
//! dispatch channel per backend connection and, for a handshake, hyper's upgrade hand-over on
//! both legs: over half of fwgate's instructions per request (bench/README.md). Here the head
//! is read into one buffer and parsed with httparse (the parser hyper uses), decided by the
//! same [`admission::admit`] as hyper's path, rewritten into one write to a backend connection
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
//!
//! # Layout
//!
//! - this file: the connection loop, reading a head and deciding it (`prepare`);
//! - `head`: which requests the path takes, and the request head rewritten for the backend;
//! - `exchange`: forwarding an upgrade or a bodiless request and relaying the answer;
//! - `response_head`: the backend's response head parsed, framed and rewritten;
//! - `chunked`: where a chunked body ends; `encode`: fwgate's own answers as bytes.

mod chunked;
mod encode;
mod exchange;
#[doc(hidden)]
pub mod fuzzing;
mod head;
mod response_head;

use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use self::encode::encode_answer;
use self::exchange::{forward_request, forward_upgrade, Forwarded};
use self::head::{upstream_request_head, RequestShape};
use super::admission::{self, Admitted, RequestHead};
use super::prefixed::Prefixed;
use super::{tunnel, ConnInfo};
use crate::gate::Gate;
use crate::limits::ConnPermit;
use crate::metrics::CloseReason;

/// Header slots parsed on the stack. A head with more goes to hyper, which applies
/// `[listen] max_headers` itself.
const REQUEST_HEADER_SLOTS: usize = 64;
/// First read buffer: a device's handshake head is a few hundred bytes.
const HEAD_BUFFER: usize = 2048;

/// What a connection task holds only while it handles HTTP: its place among
/// `max_open_connections` and the shutdown wait. Released when a tunnel starts, as hyper's
/// path does (tunnels outlive the drain and are closed by policy or idleness).
pub(super) struct ConnGuards {
    /// Dropped when the connection stops doing HTTP (shutdown waits for all of them).
    pub _alive: mpsc::Sender<()>,
    /// The `max_open_connections` slot.
    pub _socket: OwnedSemaphorePermit,
    /// The place in `max_connections_per_ip`, when that cap is on.
    pub _per_ip: Option<super::per_ip::PerIpSlot>,
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
    let mut first = true;
    loop {
        let step = match next_step(
            &gate,
            &info,
            &slot,
            &stream,
            &mut buf,
            &mut filled,
            &mut stop,
            std::mem::take(&mut first),
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

/// Reads until the buffer holds a complete head (or a reason to stop). The first head must
/// arrive within `header_read_timeout` of the accept; after a response, the connection may
/// idle for `keepalive_timeout`, and from the first byte of the next request its head has
/// `header_read_timeout`. None: the connection is over (closed by the client, timed out,
/// shutting down while idle, or a socket error).
#[allow(clippy::too_many_arguments)]
async fn next_step(
    gate: &Gate,
    info: &ConnInfo,
    slot: &Arc<ConnPermit>,
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    filled: &mut usize,
    stop: &mut watch::Receiver<bool>,
    first: bool,
) -> Option<Step> {
    let listen = &gate.config.listen;
    // Waiting for the first byte of a later request is keep-alive idling.
    let mut keepalive = !first && *filled == 0;
    let mut deadline = tokio::time::Instant::now()
        + if keepalive {
            listen.keepalive_timeout
        } else {
            listen.header_read_timeout
        };
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
                if std::mem::take(&mut keepalive) {
                    deadline = tokio::time::Instant::now() + listen.header_read_timeout;
                }
                line_ended = buf[*filled..*filled + n].contains(&b'\n');
                *filled += n;
            }
            Ok(Err(_)) => {
                gate.metrics.connection_closed(CloseReason::io);
                return None;
            }
            Err(_) => {
                gate.metrics.connection_closed(if keepalive {
                    CloseReason::keepalive_timeout
                } else {
                    CloseReason::header_timeout
                });
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
    // Rules decide on the normalised path, and the backend gets that same path.
    let path = crate::path::normalize(target.path());
    let head = RequestHead {
        headers,
        method: method.as_str(),
        path: &path,
        query: target.query(),
        target_len: target.as_str().len(),
        connection_may_name_headers: shape.lists_names,
    };
    let admitted = match admission::admit(gate, info, slot, &head) {
        admission::Admission::Admit(admitted) => admitted,
        admission::Admission::Refuse(refusal) => {
            return Some(Step::Respond {
                consumed,
                bytes: encode_answer(&refusal, close),
                close,
            })
        }
    };
    let normalized_target;
    let upstream_target = match (&path, target.query()) {
        (std::borrow::Cow::Borrowed(_), _) => target.as_str(),
        (std::borrow::Cow::Owned(p), None) => p.as_str(),
        (std::borrow::Cow::Owned(p), Some(q)) => {
            normalized_target = format!("{p}?{q}");
            normalized_target.as_str()
        }
    };
    let upstream_head = upstream_request_head(
        &method,
        upstream_target,
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
        path: Arc::from(&*path),
        close,
    });
    Some(match upgrade {
        Some(_) => Step::Upgrade(plan),
        None => Step::Request(plan),
    })
}
