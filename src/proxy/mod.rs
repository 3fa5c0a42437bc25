//! The device-facing side: accept, read a bounded request head, decide, refuse cheaply or
//! forward (plain HTTP streamed, upgrades tunnelled).
//!
//! One connection, in order: accept → HTTP/1.1 head read (bounded time and size, hyper answers
//! 400/431 itself for malformed or oversize heads) → one rules snapshot → extract and parse the
//! version → decide → refuse with a static response, or forward → for an upgrade, return the
//! 101 and join both ends in a task registered with the connection registry.

pub mod forward;
pub mod h1;
mod idle;
pub mod per_ip;
pub mod prefixed;
pub mod proxy_protocol;
pub mod response;
pub mod tunnel;

mod admission;
mod outcome;
mod service;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::limits::ConnPermit;
use crate::metrics::CloseReason;

use crate::gate::Gate;

/// Over `[limits] max_connections`: answer a static 503 without parsing anything, then close.
async fn refuse_at_accept(gate: Arc<Gate>, stream: tokio::net::TcpStream) {
    let decider = &gate.limit_deciders.max_connections;
    let retry = match gate.refuse_by(decider, None) {
        crate::gate::Verdict::Refuse(r, _, _) => r.retry_after_secs().unwrap_or(10),
        crate::gate::Verdict::Forward(_) => 10,
    };
    answer_503_and_close(stream, retry, "too many open connections, retry later\n").await;
}

/// Writes a static 503 with `Retry-After` and closes, bounded to one second.
async fn answer_503_and_close(mut stream: TcpStream, retry: u64, body: &str) {
    use tokio::io::AsyncWriteExt as _;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: {retry}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// What the connection layer knows about a client, handed to every request on it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client as fwgate believes it: the PROXY header's source when one was accepted,
    /// else the TCP peer.
    pub client: SocketAddr,
    /// `"http"` or `"https"`, for `X-Forwarded-Proto`.
    pub scheme: &'static str,
    /// Identity from a verified client certificate (CN, else first DNS SAN).
    pub cert_identity: Option<Arc<str>>,
}

/// Whether `ip` is inside any of `nets`.
pub fn in_networks(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// Binds a listener with `SO_REUSEADDR` (restart without waiting for TIME_WAIT) and `backlog`.
/// `TCP_NODELAY` is set on the listener: Linux hands it down to every accepted socket, which
/// spares one `setsockopt` per connection (small device messages must not wait for Nagle).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Accepts device connections until `shutdown` resolves, then lets every open HTTP exchange
/// finish (keep-alive connections close after their current request) and returns. At most
/// `[listen] max_open_connections` sockets are open at once: past it, accept pauses and the
/// kernel backlog absorbs the excess.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<crate::TlsListener>>,
    gate: Arc<Gate>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    // Each connection task holds a sender; when all are dropped, every connection has ended.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let sockets = Arc::new(Semaphore::new(gate.config.listen.max_open_connections));
    let per_ip = per_ip::PerIpConnections::new(gate.config.listen.max_connections_per_ip);
    let mut nodelay_inherited: Option<bool> = None;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = accept(&listener, &sockets) => a,
            () = &mut shutdown => break,
        };
        let (stream, peer, socket_permit) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE/ENFILE: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        gate.metrics.connections_accepted.inc();
        let Some(slot) = gate.global.connection() else {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _socket = socket_permit;
                refuse_at_accept(gate, stream).await;
            });
            continue;
        };
        // Whether accepted sockets inherit TCP_NODELAY from this listener (one made by `bind`
        // on Linux) is checked at the first accept; otherwise each connection sets it.
        let inherited = *nodelay_inherited.get_or_insert_with(|| stream.nodelay().unwrap_or(false));
        if !inherited {
            let _ = stream.set_nodelay(true);
        }
        let gate = gate.clone();
        let stop = stop_rx.clone();
        let alive = alive_tx.clone();
        let tls = tls.clone();
        // Boxed: a task's allocation is sized by its future and outlives it while any waker
        // remains; the box is freed when the connection ends or becomes a tunnel.
        let guards = h1::ConnGuards {
            _alive: alive,
            _socket: socket_permit,
            _per_ip: None,
        };
        tokio::spawn(ConnectionTask::Http(Box::pin(serve_connection(
            gate,
            tls,
            stream,
            peer,
            slot,
            stop,
            guards,
            per_ip.clone(),
        ))));
    }
    let _ = stop_tx.send(true);
    drop(alive_tx);
    // Resolves when every connection task has dropped its sender.
    let _ = alive_rx.recv().await;
}

async fn accept(
    listener: &TcpListener,
    sockets: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    // The semaphore is never closed, so acquiring cannot fail; map it anyway rather than panic.
    let permit = sockets
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| std::io::Error::other("connection semaphore closed"))?;
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, permit))
}

/// A tunnel that a connection became, run by the connection's own task.
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A device connection's task: its HTTP phase, then the tunnel it may become. One task for
/// both spares a spawn per handshake; the HTTP phase's box is freed when the tunnel starts, so
/// an idle tunnel holds only the tunnel's own state and this small enum.
enum ConnectionTask<H> {
    Http(Pin<Box<H>>),
    Tunnel(Tunnel),
    Done,
}

impl<H: Future<Output = Option<Tunnel>>> Future for ConnectionTask<H> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::task::Poll;
        loop {
            let next = match &mut *self {
                ConnectionTask::Http(http) => match http.as_mut().poll(cx) {
                    Poll::Ready(Some(tunnel)) => ConnectionTask::Tunnel(tunnel),
                    Poll::Ready(None) => ConnectionTask::Done,
                    Poll::Pending => return Poll::Pending,
                },
                ConnectionTask::Tunnel(tunnel) => match tunnel.as_mut().poll(cx) {
                    Poll::Ready(()) => ConnectionTask::Done,
                    Poll::Pending => return Poll::Pending,
                },
                ConnectionTask::Done => return Poll::Ready(()),
            };
            // Replacing the HTTP phase drops it (its buffers, hyper state) before the tunnel runs.
            *self = next;
        }
    }
}

/// One device connection: PROXY header (from trusted networks only), the per-address cap
/// when set, TLS if configured, then HTTP/1.1 or (when ALPN chose it) HTTP/2.
#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    gate: Arc<Gate>,
    tls: Option<Arc<crate::TlsListener>>,
    mut stream: TcpStream,
    peer: SocketAddr,
    slot: ConnPermit,
    stop: watch::Receiver<bool>,
    mut guards: h1::ConnGuards,
    per_ip: Option<Arc<per_ip::PerIpConnections>>,
) -> Option<Tunnel> {
    let listen = &gate.config.listen;
    let client = if listen.proxy_protocol {
        if !in_networks(peer.ip(), &listen.trusted_proxies) {
            gate.metrics.connection_closed(CloseReason::untrusted_proxy);
            tracing::debug!(peer = %peer, "PROXY protocol expected but peer is not a trusted proxy; closed");
            return None;
        }
        match tokio::time::timeout(
            listen.header_read_timeout,
            proxy_protocol::read_header(&mut stream),
        )
        .await
        {
            Ok(Ok(Some(source))) => source,
            Ok(Ok(None)) => peer,
            Ok(Err(e)) => {
                gate.metrics
                    .connection_closed(CloseReason::bad_proxy_header);
                tracing::debug!(peer = %peer, error = %e, "bad PROXY header; closed");
                return None;
            }
            Err(_) => {
                gate.metrics.connection_closed(CloseReason::header_timeout);
                return None;
            }
        }
    } else {
        peer
    };
    // The client as the PROXY header names it: behind a TCP load balancer, the balancer's
    // address would otherwise count every device as one.
    if let Some(per_ip) = per_ip {
        match per_ip.try_acquire(client.ip()) {
            Some(held) => guards._per_ip = Some(held),
            None => {
                gate.metrics.connection_closed(CloseReason::per_ip_limit);
                let retry = gate.config.limits.retry_after.as_secs().max(1);
                let body = "too many open connections from this address, retry later\n";
                answer_503_and_close(stream, retry, body).await;
                return None;
            }
        }
    }
    let Some(tls) = tls else {
        let info = ConnInfo {
            client,
            scheme: "http",
            cert_identity: None,
        };
        if listen.fast_path {
            return h1::serve(gate, stream, info, slot, stop, guards).await;
        }
        let _guards = guards;
        let io = TokioIo::new(stream);
        Box::pin(serve_http(gate, io, info, Arc::new(slot), stop)).await;
        return None;
    };
    // Boxed when reached: rustls's state held inline would make every plain connection's
    // future (copied whole into its box at accept) over a kilobyte larger.
    let _guards = guards;
    Box::pin(serve_tls(gate, &tls, stream, client, slot, stop)).await;
    None
}

/// A TLS device connection: the handshake (bounded like a request head), then HTTP/1.1 or,
/// when ALPN chose it, HTTP/2.
async fn serve_tls(
    gate: Arc<Gate>,
    tls: &crate::TlsListener,
    stream: TcpStream,
    client: SocketAddr,
    slot: ConnPermit,
    stop: watch::Receiver<bool>,
) {
    let listen = &gate.config.listen;
    // Bounded like the request head: a client stalling mid-handshake is a slowloris too.
    let stream =
        match tokio::time::timeout(listen.header_read_timeout, tls.acceptor().accept(stream)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                gate.metrics.connection_closed(CloseReason::tls_handshake);
                tracing::debug!(client = %client, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                gate.metrics.connection_closed(CloseReason::tls_handshake);
                return;
            }
        };
    let session = stream.get_ref().1;
    let h2 = session.alpn_protocol() == Some(b"h2".as_slice());
    let cert_identity = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::tls::client_cert_identity)
        .map(Arc::from);
    let info = ConnInfo {
        client,
        scheme: "https",
        cert_identity,
    };
    // Boxed when reached: inline, hyper's connection state (kilobytes) would size this future,
    // and so every TLS connection, from the start of its handshake.
    let slot = Arc::new(slot);
    if h2 {
        Box::pin(serve_h2(gate, TokioIo::new(stream), info, slot, stop)).await;
    } else {
        Box::pin(serve_http(gate, TokioIo::new(stream), info, slot, stop)).await;
    }
}

/// A hyper server connection that can be asked to finish its current exchanges and stop.
trait DrainableConnection: Future {
    fn start_draining(self: Pin<&mut Self>);
}

impl<I, S> DrainableConnection for http1::UpgradeableConnection<I, S>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn start_draining(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> DrainableConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn start_draining(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs a connection to its end; when shutdown starts, or the connection idled out between
/// requests (`idle` resolved), lets its current exchanges finish. True when it idled out.
async fn until_done_or_drained<C: DrainableConnection>(
    conn: C,
    stop: &mut watch::Receiver<bool>,
    idle: impl Future<Output = ()>,
) -> (C::Output, bool) {
    tokio::pin!(conn);
    let stopping = async {
        // The watch guard is dropped inside this block, before any other await.
        let _ = stop.wait_for(|s| *s).await.map(|_| ());
    };
    tokio::select! {
        r = conn.as_mut() => (r, false),
        () = stopping => {
            conn.as_mut().start_draining();
            (conn.await, false)
        }
        () = idle => {
            conn.as_mut().start_draining();
            (conn.await, true)
        }
    }
}

/// The admission service for one connection. The connection slot is shared with every
/// request on it and handed to a tunnel on upgrade, so it stays taken for as long as anything
/// of the connection is open.
/// Every request counts in `keep_alive` until its response body is done.
fn admission_service(
    gate: &Arc<Gate>,
    info: ConnInfo,
    slot: Arc<ConnPermit>,
    keep_alive: Arc<idle::KeepAlive>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<idle::Tracked<response::ResponseBody>>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    let (gate, info) = (gate.clone(), Arc::new(info));
    service_fn(move |req| {
        let in_flight = keep_alive.begin();
        let answer = service::handle(gate.clone(), info.clone(), slot.clone(), req);
        async move {
            let response = answer.await?;
            Ok(response.map(|body| idle::Tracked::new(body, in_flight)))
        }
    })
}

/// Serves HTTP/2 (negotiated by ALPN over TLS): plain requests through the same rules; upgrades
/// (WebSocket) stay on HTTP/1.1.
async fn serve_h2<I>(
    gate: Arc<Gate>,
    io: I,
    info: ConnInfo,
    slot: Arc<ConnPermit>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let keep_alive = idle::KeepAlive::new();
    let svc = admission_service(&gate, info, slot, keep_alive.clone());
    let listen = &gate.config.listen;
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(listen.max_header_bytes as u32)
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .serve_connection(io, svc);
    let idle = keep_alive.idled_out(listen.keepalive_timeout);
    let (result, idled_out) = until_done_or_drained(conn, &mut stop, idle).await;
    if idled_out {
        gate.metrics
            .connection_closed(CloseReason::keepalive_timeout);
    }
    if let Err(e) = result {
        gate.metrics.connection_closed(CloseReason::io);
        tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
    }
}

/// Serves HTTP/1.1 (with upgrades) on one connection until it ends or shutdown drains it.
pub(super) async fn serve_http<I>(
    gate: Arc<Gate>,
    io: I,
    info: ConnInfo,
    slot: Arc<ConnPermit>,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let keep_alive = idle::KeepAlive::new();
    let svc = admission_service(&gate, info, slot, keep_alive.clone());
    let listen = &gate.config.listen;
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(listen.header_read_timeout)
        .max_buf_size(listen.max_header_bytes)
        .max_headers(listen.max_headers)
        .serve_connection(io, svc)
        .with_upgrades();
    let idle = keep_alive.idled_out(listen.keepalive_timeout);
    let (result, idled_out) = until_done_or_drained(conn, &mut stop, idle).await;
    if idled_out {
        gate.metrics
            .connection_closed(CloseReason::keepalive_timeout);
    }
    if let Err(e) = result {
        let reason = if e.is_timeout() {
            CloseReason::header_timeout
        } else if e.is_parse_too_large() {
            CloseReason::head_too_large
        } else if e.is_parse() {
            CloseReason::bad_request
        } else {
            CloseReason::io
        };
        gate.metrics.connection_closed(reason);
        tracing::debug!(error = %e, ?reason, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "TCP_NODELAY not inherited: every connection would need its own setsockopt"
        );
        drop(client);
    }
}
