//! Forwarding to the backend: pooled HTTP/1.1 connections with a timed connect, header rewriting
//! the way nginx users expect (hop-by-hop removed per RFC 9110 §7.6.1, `X-Forwarded-For`
//! appended, `X-Forwarded-Proto` set, `Forwarded` appended, `Host` preserved), and the mapping of
//! backend failures to 502/504.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, UPGRADE};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpStream;

use super::response::ProxyFailure;
use crate::config::UpstreamConfig;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// A backend connection: plain TCP (the common case, eligible for the buffer-free tunnel) or TLS.
pub type UpstreamStream = crate::tls::ClientStream;

/// Opens backend connections: bounded in number while in progress, with a timeout covering the
/// TLS handshake too, and the connect time recorded.
struct Connector {
    addr: Arc<str>,
    /// `addr` when it is an IP address and port: connected without a lookup, and without
    /// waiting for the reactor when the connection is made during the call (loopback).
    literal: Option<SocketAddr>,
    timeout: Duration,
    connect_seconds: Histogram,
    pending: Gauge,
    max_pending: usize,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// Connects to an address, as tokio's `TcpStream::connect` does, except that a connection
/// already made when `connect(2)` returns (a loopback or nearby backend: the handshake ran
/// inside the call) is used at once, without a trip through the reactor for its readiness.
/// Nagle is off (small device messages must not wait).
async fn connect_to(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    // As on the named path: a socket that refuses it still carries the exchange.
    let _ = socket.set_tcp_nodelay(true);
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // Connected: the peer is known. Otherwise the connect is still in progress (or failed):
    // its outcome comes with writability, as for tokio's own connect.
    if stream.peer_addr().is_ok() {
        return Ok(stream);
    }
    stream.writable().await?;
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Ok(stream),
    }
}

/// Decrements the pending-connect gauge however the connect ends.
struct PendingConnect(Gauge);

impl Drop for PendingConnect {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Connector {
    async fn connect(&self) -> Result<UpstreamStream, ProxyFailure> {
        // Bounded: a dead or slow backend must not pile up sockets in SYN_SENT.
        if self.pending.inc() >= self.max_pending as i64 {
            self.pending.dec();
            return Err(ProxyFailure::UpstreamBusy);
        }
        let _pending = PendingConnect(self.pending.clone());
        let started = Instant::now();
        let connect = async {
            let stream = match self.literal {
                Some(addr) => connect_to(addr).await?,
                None => {
                    let stream = TcpStream::connect(&*self.addr).await?;
                    // Small device messages must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    stream
                }
            };
            match &self.tls {
                None => Ok::<_, io::Error>(UpstreamStream::Plain(stream)),
                // Boxed: rustls's handshake state is about a kilobyte, and inline it would
                // size (and be copied with) every plain connect and the handshake around it.
                Some((connector, name)) => Box::pin(connector.connect(name.clone(), stream))
                    .await
                    .map(|s| UpstreamStream::Tls(Box::new(s))),
            }
        };
        let deadline = tokio::time::Instant::from_std(started) + self.timeout;
        match tokio::time::timeout_at(deadline, connect).await {
            Err(_) => Err(ProxyFailure::UpstreamConnectTimeout),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, backend = %self.addr, "backend connect failed");
                Err(ProxyFailure::UpstreamUnreachable)
            }
            Ok(Ok(stream)) => {
                self.connect_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(stream)
            }
        }
    }
}

/// Why the client's request body could not be forwarded: the client's doing, never the
/// backend's (a 400 or 408, counted as a client error).
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// No byte of the body arrived for `[listen] body_read_timeout`.
    #[error("no request body bytes for {0:?} (body_read_timeout)")]
    Timeout(Duration),
    /// The body was malformed (bad chunked framing) or cut short.
    #[error("malformed request body: {0}")]
    Malformed(#[source] hyper::Error),
}

/// The request body sent to the backend: the client's, streamed frame by frame as it arrives,
/// counting bytes for the access log, with at most `read_timeout` between two reads (as
/// nginx's `client_body_timeout`): a body that stalls frees its backend connection.
pub struct UpstreamRequestBody {
    inner: Incoming,
    sent: Arc<AtomicU64>,
    read_timeout: Duration,
    /// Armed when a read finds nothing; made on the first such wait (a bodiless request never
    /// makes one).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl UpstreamRequestBody {
    /// Wraps the client's body; `sent` accumulates the bytes forwarded; `read_timeout` bounds
    /// each wait for the next bytes (zero: no bound).
    pub fn new(
        inner: Incoming,
        sent: Arc<AtomicU64>,
        read_timeout: Duration,
    ) -> UpstreamRequestBody {
        UpstreamRequestBody {
            inner,
            sent,
            read_timeout,
            stall: None,
            armed: false,
        }
    }
}

impl hyper::body::Body for UpstreamRequestBody {
    type Data = bytes::Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                if let Some(data) = frame.data_ref() {
                    this.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ClientBodyError::Malformed(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.read_timeout.is_zero() => Poll::Pending,
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.read_timeout;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    stall.as_mut().reset(deadline);
                    this.armed = true;
                }
                match std::future::Future::poll(stall.as_mut(), cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(ClientBodyError::Timeout(this.read_timeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The client-side failure behind a failed backend exchange, if the client's body caused it.
fn client_body_failure(e: &hyper::Error) -> Option<ProxyFailure> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(body) = s.downcast_ref::<ClientBodyError>() {
            return Some(match body {
                ClientBodyError::Timeout(_) => ProxyFailure::ClientBodyTimeout,
                ClientBodyError::Malformed(_) => ProxyFailure::ClientBodyMalformed,
            });
        }
        source = s.source();
    }
    None
}

type Sender = hyper::client::conn::http1::SendRequest<UpstreamRequestBody>;

/// Idle keep-alive connections to the backend, most recently used last.
struct IdlePool<T> {
    idle: Mutex<Vec<(T, Instant)>>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// A backend connection the idle pool can hold: hyper's sender, or a raw stream the HTTP/1.1
/// fast path speaks on itself.
trait Pooled {
    /// The backend closed it (or it can no longer carry a request).
    fn is_closed(&self) -> bool;
    /// It can take a request now (not still finishing an earlier exchange).
    fn is_ready(&self) -> bool;
}

impl Pooled for Sender {
    fn is_closed(&self) -> bool {
        Sender::is_closed(self)
    }

    fn is_ready(&self) -> bool {
        Sender::is_ready(self)
    }
}

impl Pooled for UpstreamStream {
    /// An idle connection has nothing to read: end-of-stream or stray bytes both rule it out.
    /// tokio answers from the readiness it tracks, without a syscall, while the socket is quiet.
    fn is_closed(&self) -> bool {
        match self {
            UpstreamStream::Plain(tcp) => {
                !matches!(tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            // Not checked without a read through rustls; a dead one is retried on a new one.
            UpstreamStream::Tls(_) => false,
        }
    }

    fn is_ready(&self) -> bool {
        true
    }
}

impl<T: Pooled> IdlePool<T> {
    fn new(max_idle: usize, idle_timeout: Duration) -> IdlePool<T> {
        IdlePool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(T, Instant)>> {
        // Plain pushes and pops: a panic elsewhere cannot leave the list inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection that is ready for a request, if any (LIFO keeps the
    /// warm ones busy and lets the rest age out). Closed ones are dropped on the way. One that
    /// is not ready yet (its previous exchange still finishing, e.g. a request body still being
    /// sent after the response ended) stays in the list for later rather than making this
    /// request wait on it.
    fn take(&self, now: Instant) -> Option<T> {
        let mut idle = self.lock();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let (conn, since) = &idle[i];
            if conn.is_closed() || now.saturating_duration_since(*since) >= self.idle_timeout {
                idle.remove(i);
            } else if conn.is_ready() {
                return Some(idle.remove(i).0);
            }
        }
        None
    }

    /// Keeps a connection for reuse; when the pool is full the oldest idle one makes room
    /// (the newest is the warmest, and LIFO order would reach it first anyway).
    fn put(&self, conn: T, since: Instant) {
        if self.max_idle == 0 || conn.is_closed() {
            return;
        }
        let evicted = {
            let mut idle = self.lock();
            let evicted = (idle.len() >= self.max_idle).then(|| idle.remove(0));
            idle.push((conn, since));
            evicted
        };
        drop(evicted);
    }

    /// Drops connections idle for longer than the idle timeout (closing them).
    fn sweep(&self) {
        let expired: Vec<(T, Instant)> = {
            let mut idle = self.lock();
            // Oldest first: everything before the first fresh entry has expired.
            let fresh = idle
                .iter()
                .position(|(s, since)| !s.is_closed() && since.elapsed() < self.idle_timeout)
                .unwrap_or(idle.len());
            idle.drain(..fresh).collect()
        };
        drop(expired);
    }
}

/// A backend connection on loan for one exchange. It goes back to the idle pool only once the
/// response was read to its end: a half-read connection cannot carry another request.
pub struct Lease {
    sender: Sender,
    pool: Arc<IdlePool<Sender>>,
}

impl Lease {
    /// Returns the connection for reuse.
    pub fn release(self) {
        self.pool.put(self.sender, Instant::now());
    }
}

/// The backend: its idle keep-alive connections and how to open new ones.
///
/// Each exchange takes a whole connection (HTTP/1.1 carries one exchange at a time) straight
/// from a LIFO list, with no per-request task: the connection's own task drives its socket.
pub struct Upstream {
    connector: Connector,
    pool: Arc<IdlePool<Sender>>,
    /// Idle raw connections of the HTTP/1.1 fast path (same limits as `pool`).
    raw: IdlePool<UpstreamStream>,
    /// `Host` for requests that came without one (HTTP/1.0).
    authority: HeaderValue,
    response_timeout: Duration,
}

impl Upstream {
    /// Builds the backend from `[upstream]`.
    pub fn new(
        cfg: &UpstreamConfig,
        connect_seconds: Histogram,
        pending: Gauge,
    ) -> Result<Upstream, String> {
        let authority: Authority = cfg
            .addr
            .parse()
            .map_err(|e| format!("upstream addr {:?}: {e}", cfg.addr))?;
        let authority = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("upstream addr {:?}: {e}", cfg.addr))?;
        let tls = match &cfg.tls {
            None => None,
            Some((ca, name)) => {
                let config = crate::tls::upstream_client_config(ca).map_err(|e| e.to_string())?;
                let name = crate::tls::upstream_server_name(name).map_err(|e| e.to_string())?;
                Some((tokio_rustls::TlsConnector::from(config), name))
            }
        };
        Ok(Upstream {
            connector: Connector {
                addr: Arc::from(cfg.addr.as_str()),
                literal: cfg.addr.parse().ok(),
                timeout: cfg.connect_timeout,
                connect_seconds,
                pending,
                max_pending: cfg.max_pending_connects,
                tls,
            },
            pool: Arc::new(IdlePool::new(cfg.pool_max_idle, cfg.pool_idle_timeout)),
            raw: IdlePool::new(cfg.pool_max_idle, cfg.pool_idle_timeout),
            authority,
            response_timeout: cfg.response_timeout,
        })
    }

    /// Opens a new backend connection (bounded and timed like every connect) for a caller that
    /// speaks HTTP/1.1 on it itself: the fast path's upgrades.
    pub async fn connect(&self) -> Result<UpstreamStream, ProxyFailure> {
        self.connector.connect().await
    }

    /// `Host` for requests that came without one.
    pub fn authority(&self) -> &[u8] {
        self.authority.as_bytes()
    }

    /// How long the backend has to send a response head.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// An idle fast-path connection, most recently used first; `now` is the caller's clock.
    pub fn take_raw(&self, now: Instant) -> Option<UpstreamStream> {
        self.raw.take(now)
    }

    /// Keeps a fast-path connection whose last response was read to its end, idle since
    /// `since`.
    pub fn put_raw(&self, conn: UpstreamStream, since: Instant) {
        self.raw.put(conn, since);
    }

    /// Closes pooled connections idle for longer than `pool_idle_timeout`.
    pub fn sweep_idle(&self) {
        self.pool.sweep();
        self.raw.sweep();
    }

    /// Sends a prepared request on a pooled connection (or a new one; always a new one for an
    /// upgrade, whose connection becomes the tunnel) and waits for the response head, bounded
    /// by `response_timeout`. A pooled connection the backend closed meanwhile is detected
    /// before the request is written, and the request goes out on a fresh one instead.
    pub async fn send(
        &self,
        mut req: Request<UpstreamRequestBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Lease), ProxyFailure> {
        // Origin form on the backend leg, whatever form the client used (HTTP/2 and
        // absolute-form requests carry a scheme and authority).
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let path = req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(path);
        }
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut()
                .insert(http::header::HOST, self.authority.clone());
        }
        let exchange = async {
            let pooled = if upgrade {
                None
            } else {
                self.pool.take(Instant::now())
            };
            let req = match pooled {
                Some(mut sender) => match sender.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, sender)),
                    Err(mut e) => match e.take_message() {
                        // Never written: the pooled connection was gone or busy after all.
                        Some(req) => req,
                        None => {
                            tracing::debug!(error = %e.error(), "backend exchange failed");
                            return Err(client_body_failure(e.error())
                                .unwrap_or(ProxyFailure::UpstreamBroken));
                        }
                    },
                },
                None => req,
            };
            let mut sender = self.open().await?;
            match sender.send_request(req).await {
                Ok(resp) => Ok((resp, sender)),
                Err(e) => {
                    tracing::debug!(error = %e, "backend exchange failed");
                    Err(client_body_failure(&e).unwrap_or(ProxyFailure::UpstreamBroken))
                }
            }
        };
        match tokio::time::timeout(self.response_timeout, exchange).await {
            Err(_) => Err(ProxyFailure::UpstreamResponseTimeout),
            Ok(Err(f)) => Err(f),
            Ok(Ok((resp, sender))) => Ok((
                resp,
                Lease {
                    sender,
                    pool: self.pool.clone(),
                },
            )),
        }
    }

    /// Opens a connection and starts the task that drives it (ending when the connection is
    /// closed or, for an upgrade, handed over).
    async fn open(&self) -> Result<Sender, ProxyFailure> {
        let stream = self.connector.connect().await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| ProxyFailure::UpstreamBroken)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Whether the request asks to switch protocols (`Connection: upgrade` plus `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_has_token(headers, "upgrade")
}

fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// hyper's largest accepted `Content-Length` (its own length type reserves the two values
/// above it).
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

/// A `Content-Length` value as hyper reads one: a comma-separated list of decimal digit
/// strings (no sign, optional spaces or tabs around each) that all agree, at most
/// [`MAX_CONTENT_LENGTH`]. None for anything else.
pub(super) fn parse_content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|&b| b == b',') {
        if part
            .iter()
            .any(|&b| !matches!(b, b'0'..=b'9' | b' ' | b'\t'))
        {
            return None;
        }
        let digits = part.trim_ascii();
        if digits.is_empty() || digits.iter().any(|b| !b.is_ascii_digit()) {
            return None;
        }
        let n = digits.iter().try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })?;
        if n > MAX_CONTENT_LENGTH || length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// Rewrites `Content-Length` in its plain decimal form (`0010` becomes `10`, `5, 5` becomes
/// `5`), so that the backend reads the length fwgate read, whatever its parser makes of
/// leading zeros. A value already plain is left alone (one comparison per byte).
pub fn normalize_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    let plain = |v: &[u8]| {
        !v.is_empty() && v.iter().all(u8::is_ascii_digit) && (v.len() == 1 || v[0] != b'0')
    };
    if values.next().is_none() && plain(first.as_bytes()) {
        return;
    }
    let mut length = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        match parse_content_length(v.as_bytes()) {
            Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
            // hyper has read the request by this value; never reached, and left alone if it is.
            _ => return,
        }
    }
    if let Some(n) = length {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// Hop-by-hop header names (RFC 9110 §7.6.1), lower case; both HTTP paths drop them.
pub(super) const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Whether a `Connection` token is a connection option rather than the name of a header to
/// drop as hop-by-hop.
pub(super) fn is_connection_option(token: &[u8]) -> bool {
    [&b"close"[..], b"keep-alive", b"upgrade"]
        .iter()
        .any(|o| token.eq_ignore_ascii_case(o))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed list plus every name listed in
/// `Connection`. When `keep_upgrade` is set, `Upgrade` survives and `Connection: upgrade` is
/// restored, so the backend sees a well-formed upgrade request (or the client a 101).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    static FIXED: [HeaderName; HOP_BY_HOP.len()] = [
        HeaderName::from_static(HOP_BY_HOP[0]),
        HeaderName::from_static(HOP_BY_HOP[1]),
        HeaderName::from_static(HOP_BY_HOP[2]),
        HeaderName::from_static(HOP_BY_HOP[3]),
        HeaderName::from_static(HOP_BY_HOP[4]),
        HeaderName::from_static(HOP_BY_HOP[5]),
    ];
    // One pass over the names (cheap comparisons) finds which of the fixed names are present:
    // most messages carry none or one, and each removal is a hashed lookup.
    let mut present = [false; FIXED.len()];
    for name in headers.keys() {
        if let Some(i) = FIXED.iter().position(|f| f == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    let upgrade = if keep_upgrade {
        headers.get(UPGRADE).cloned()
    } else {
        None
    };
    if present[0] {
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && !is_connection_option(t.as_bytes()))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for (name, _) in FIXED.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    if let Some(u) = upgrade {
        headers.insert(UPGRADE, u);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Removes header names with `_` (as nginx does by default): CGI-style backends fold
/// `X_Firmware_Version` and `X-Firmware-Version` into one variable, and fwgate reads only the
/// latter. One pass over the names; most requests have none.
pub(super) fn drop_underscored_headers(headers: &mut http::HeaderMap) {
    if !headers.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        headers.remove(&name);
    }
}

/// The request headers as hyper's path sends them to the backend: hop-by-hop headers removed
/// (`Upgrade` kept for an upgrade), names with `_` dropped, `Content-Length` in plain decimal, `Host` from the
/// request's authority when it has none (HTTP/2 carries it in `:authority`; a request with
/// neither gets the backend's address from [`Upstream::send`]), and the forwarding headers.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    upgrade: bool,
    authority: Option<&Authority>,
    client: SocketAddr,
    proto: &'static str,
) {
    strip_hop_by_hop(headers, upgrade);
    drop_underscored_headers(headers);
    normalize_content_length(headers);
    if !headers.contains_key(http::header::HOST) {
        if let Some(host) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            headers.insert(http::header::HOST, host);
        }
    }
    add_forwarding_headers(headers, client, proto);
}

/// Adds the forwarding headers nginx users expect: `X-Forwarded-For` gets the client appended
/// (`$proxy_add_x_forwarded_for`), `X-Forwarded-Proto` is set to the scheme the client used,
/// and an RFC 7239 `Forwarded` element is appended. `Host` is left as the client sent it.
pub fn add_forwarding_headers(headers: &mut HeaderMap, client: SocketAddr, proto: &'static str) {
    let mut xff = Vec::with_capacity(48);
    push_x_forwarded_for(
        &mut xff,
        headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .map(|v| v.as_bytes()),
        client,
    );
    let mut forwarded = Vec::with_capacity(96);
    push_forwarded(
        &mut forwarded,
        headers.get_all(FORWARDED).iter().map(|v| v.as_bytes()),
        headers.get(http::header::HOST).map(|h| h.as_bytes()),
        client,
        proto,
    );
    // Both values are built from an IP address, fixed tokens, checked values and the visible
    // ASCII of existing headers: always valid.
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)) {
        headers.insert(FORWARDED, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

/// Appends the new `X-Forwarded-For` value: the existing ones (visible ASCII only) with this
/// hop's address. Shared by hyper's path and the HTTP/1.1 fast path (which writes it straight
/// into the request head) so that both send the same bytes.
pub(super) fn push_x_forwarded_for<'a>(
    out: &mut Vec<u8>,
    existing: impl Iterator<Item = &'a [u8]>,
    client: SocketAddr,
) {
    for v in existing.filter(|v| crate::extract::is_visible_ascii(v)) {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    push_ip(out, client.ip());
}

/// Appends the new `Forwarded` value: the existing elements (visible ASCII only) and this
/// hop's (`for`, `proto`, and `host` when it is a plain host name). Shared like
/// [`push_x_forwarded_for`].
pub(super) fn push_forwarded<'a>(
    out: &mut Vec<u8>,
    existing: impl Iterator<Item = &'a [u8]>,
    host: Option<&[u8]>,
    client: SocketAddr,
    proto: &'static str,
) {
    use std::io::Write as _;
    for v in existing.filter(|v| crate::extract::is_visible_ascii(v)) {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(b"for=");
    match client.ip() {
        ip @ std::net::IpAddr::V4(_) => push_ip(out, ip),
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "\"[{v6}]\"");
        }
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(proto.as_bytes());
    if let Some(host) = host {
        if host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(b))
        {
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(host);
            out.push(b'"');
        }
    }
}

/// Appends an address in its usual text form; IPv4 (the common case) without the formatting
/// machinery, which costs more than the rest of the header rewrite.
fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    use std::io::Write as _;
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_literal_backend_is_connected_with_nagle_off_and_takes_bytes_written_directly() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect_to(addr).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
        assert!(stream.nodelay().unwrap(), "Nagle must be off");
        let (mut accepted, _) = listener.accept().await.unwrap();
        // Written straight to the socket, as the fast path writes a request head.
        assert_eq!(super::super::tunnel::send_now(&stream, b"ping").unwrap(), 4);
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), accepted.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn a_refused_literal_connect_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let result = tokio::time::timeout(Duration::from_secs(10), connect_to(addr))
            .await
            .unwrap();
        assert_eq!(
            result.map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }

    #[tokio::test]
    async fn a_named_backend_is_looked_up_and_connected() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let toml = format!("[upstream]\naddr = \"localhost:{port}\"\n");
        let config = crate::config::Config::from_toml(&toml, None).unwrap();
        let upstream = Upstream::new(
            &config.upstream,
            Histogram::new([1.0].into_iter()),
            Gauge::default(),
        )
        .unwrap();
        assert!(upstream.connector.literal.is_none());
        // localhost may resolve to ::1 first, where nothing listens: tokio tries the next.
        let mut stream = upstream.connect().await.unwrap();
        stream.write_all(b"x").await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let mut got = [0u8; 1];
        accepted.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_removed_including_listed_ones() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn end_to_end_headers_are_left_alone() {
        let mut h = map(&[
            ("host", "a"),
            ("x-firmware-version", "3.7.0"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(!h.contains_key(UPGRADE) && !h.contains_key(CONNECTION));
        let mut h = map(&[("host", "a")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn upgrade_survives_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.9.99",
            "255.255.255.255",
            "100.10.1.0",
            "::1",
            "2001:db8::8:800:200c:417a",
            "::ffff:192.0.2.1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = Vec::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }

    #[test]
    fn forwarding_headers_append_like_nginx() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("host", "devices.example:8080"),
        ]);
        add_forwarding_headers(&mut h, "192.0.2.7:5555".parse().unwrap(), "http");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.7;proto=http;host=\"devices.example:8080\""
        );
        assert_eq!(h["host"], "devices.example:8080");

        let mut h = HeaderMap::new();
        add_forwarding_headers(&mut h, "[::1]:1".parse().unwrap(), "https");
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=https");
    }
}
