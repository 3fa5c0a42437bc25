//! Forwarding to the backend: a pooled HTTP/1.1 client with a timed connector, header rewriting
//! the way nginx users expect (hop-by-hop removed per RFC 9110 §7.6.1, `X-Forwarded-For`
//! appended, `X-Forwarded-Proto` set, `Forwarded` appended, `Host` preserved), and the mapping of
//! backend failures to 502/504.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpStream;

use super::response::ProxyFailure;
use crate::config::UpstreamConfig;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A backend connection: plain TCP (the common case, eligible for the buffer-free tunnel) or TLS.
pub enum UpstreamStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl hyper_util::client::legacy::connect::Connection for UpstreamStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

/// Connects to the backend with a timeout (covering the TLS handshake too) and records the
/// connect time.
#[derive(Clone)]
pub struct TimedConnector {
    addr: Arc<str>,
    timeout: Duration,
    connect_seconds: Histogram,
    pending: Gauge,
    max_pending: usize,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// Decrements the pending-connect gauge however the connect ends.
struct PendingConnect(Gauge);

impl Drop for PendingConnect {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl tower_service::Service<Uri> for TimedConnector {
    type Response = TokioIo<UpstreamStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<UpstreamStream>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        // Bounded: a dead or slow backend must not pile up sockets in SYN_SENT.
        if self.pending.inc() >= self.max_pending as i64 {
            self.pending.dec();
            return Box::pin(async {
                Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "too many backend connects in progress",
                ))
            });
        }
        let pending = PendingConnect(self.pending.clone());
        let addr = self.addr.clone();
        let limit = self.timeout;
        let histogram = self.connect_seconds.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let _pending = pending;
            let started = Instant::now();
            let connect = async {
                let stream = TcpStream::connect(&*addr).await?;
                // Small device messages must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                match tls {
                    None => Ok(UpstreamStream::Plain(stream)),
                    Some((connector, name)) => connector
                        .connect(name, stream)
                        .await
                        .map(|s| UpstreamStream::Tls(Box::new(s))),
                }
            };
            let stream = tokio::time::timeout(limit, connect).await.map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "backend connect timed out")
            })??;
            histogram.observe(started.elapsed().as_secs_f64());
            Ok(TokioIo::new(stream))
        })
    }
}

/// The request body sent to the backend: the client's, streamed frame by frame as it arrives,
/// counting bytes for the access log.
pub struct UpstreamRequestBody {
    inner: Incoming,
    sent: Arc<AtomicU64>,
}

impl UpstreamRequestBody {
    /// Wraps the client's body; `sent` accumulates the bytes forwarded.
    pub fn new(inner: Incoming, sent: Arc<AtomicU64>) -> UpstreamRequestBody {
        UpstreamRequestBody { inner, sent }
    }
}

impl hyper::body::Body for UpstreamRequestBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The backend: a pooled client plus what is needed to address it.
pub struct Upstream {
    client: Client<TimedConnector, UpstreamRequestBody>,
    authority: Authority,
    response_timeout: Duration,
}

impl Upstream {
    /// Builds the pooled client from `[upstream]`.
    pub fn new(
        cfg: &UpstreamConfig,
        connect_seconds: Histogram,
        pending: Gauge,
    ) -> Result<Upstream, String> {
        let authority: Authority = cfg
            .addr
            .parse()
            .map_err(|e| format!("upstream addr {:?}: {e}", cfg.addr))?;
        let tls = match &cfg.tls {
            None => None,
            Some((ca, name)) => {
                let config = crate::tls::upstream_client_config(ca).map_err(|e| e.to_string())?;
                let name = crate::tls::upstream_server_name(name).map_err(|e| e.to_string())?;
                Some((tokio_rustls::TlsConnector::from(config), name))
            }
        };
        let connector = TimedConnector {
            addr: Arc::from(cfg.addr.as_str()),
            timeout: cfg.connect_timeout,
            connect_seconds,
            pending,
            max_pending: cfg.max_pending_connects,
            tls,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Upstream {
            client,
            authority,
            response_timeout: cfg.response_timeout,
        })
    }

    /// Sends a prepared request; maps every failure to a [`ProxyFailure`].
    pub async fn send(
        &self,
        mut req: Request<UpstreamRequestBody>,
    ) -> Result<Response<Incoming>, ProxyFailure> {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyFailure::UpstreamBroken)?;
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyFailure::UpstreamResponseTimeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
        }
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> ProxyFailure {
    if !e.is_connect() {
        return ProxyFailure::UpstreamBroken;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                return ProxyFailure::UpstreamConnectTimeout;
            }
            if io.kind() == io::ErrorKind::ResourceBusy {
                return ProxyFailure::UpstreamBusy;
            }
        }
        source = s.source();
    }
    ProxyFailure::UpstreamUnreachable
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

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed list plus every name listed in
/// `Connection`. When `keep_upgrade` is set, `Upgrade` survives and `Connection: upgrade` is
/// restored, so the backend sees a well-formed upgrade request (or the client a 101).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = if keep_upgrade {
        headers.get(UPGRADE).cloned()
    } else {
        None
    };
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|k| t.eq_ignore_ascii_case(k))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        TE,
        TRANSFER_ENCODING,
        UPGRADE,
    ] {
        headers.remove(name);
    }
    if let Some(u) = upgrade {
        headers.insert(UPGRADE, u);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Adds the forwarding headers nginx users expect: `X-Forwarded-For` gets the client appended
/// (`$proxy_add_x_forwarded_for`), `X-Forwarded-Proto` is set to the scheme the client used,
/// and an RFC 7239 `Forwarded` element is appended. `Host` is left as the client sent it.
pub fn add_forwarding_headers(headers: &mut HeaderMap, client: SocketAddr, proto: &'static str) {
    let ip = client.ip();
    let existing: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let xff = if existing.is_empty() {
        ip.to_string()
    } else {
        format!("{}, {ip}", existing.join(", "))
    };
    let node = match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={node};proto={proto}");
    if let Some(host) = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        if host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
        {
            element.push_str(";host=\"");
            element.push_str(host);
            element.push('"');
        }
    }
    let forwarded: Vec<&str> = headers
        .get_all(FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded = if forwarded.is_empty() {
        element
    } else {
        format!("{}, {element}", forwarded.join(", "))
    };
    // Both values are built from an IP address, fixed tokens and a checked host: always valid.
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        headers.insert(FORWARDED, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn upgrade_survives_when_asked() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
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
