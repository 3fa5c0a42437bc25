//! A loopback device backend for rehearsals whose bad cohort is slow, as the real backend was
//! on 2020-02-08: it answers every WebSocket upgrade with a 101 and then echoes messages, and
//! every plain request with 200, but for one firmware version (its `X-Firmware-Version` header,
//! compared case-insensitively) the answer comes only after a delay. fwgate's census then sees
//! that cohort's backend time rise and the console flags it. Shared by `examples/storm`
//! (`--serve-backend`) and the console's browser tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// Largest request head read (fwgate's own default limit).
const MAX_HEAD: usize = 16 * 1024;
/// A request head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Which cohort is slow, and by how much.
#[derive(Debug, Clone, Default)]
pub struct BackendConfig {
    /// The slow firmware version, as devices send it (None: nobody is slow).
    pub slow_version: Option<String>,
    /// How long its 101 (or response) waits.
    pub slow: Duration,
}

/// What the backend has done so far.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// Answers delayed because they came from the slow cohort.
    pub slowed: AtomicU64,
    /// WebSockets open now.
    pub open: AtomicU64,
}

/// Serves `listener` until the task is dropped (or the listener fails).
pub async fn serve(listener: TcpListener, config: BackendConfig, stats: Arc<BackendStats>) {
    let config = Arc::new(config);
    while let Ok((stream, peer)) = listener.accept().await {
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (config, stats) = (config.clone(), stats.clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &config, &stats).await {
                // Devices and fwgate close connections all the time in a rehearsal: only say
                // what is unusual.
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    eprintln!("backend: {peer}: {e}");
                }
            }
        });
    }
}

/// Binds `addr` and serves it in a new task; returns the bound address.
pub async fn start(
    addr: SocketAddr,
    config: BackendConfig,
) -> std::io::Result<(SocketAddr, Arc<BackendStats>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let stats = Arc::new(BackendStats::default());
    tokio::spawn(serve(listener, config, stats.clone()));
    Ok((bound, stats))
}

/// The parts of a request head this backend looks at.
struct Head {
    version: Option<String>,
    websocket_key: Option<String>,
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let value = |name: &str| {
                    req.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(|v| v.trim().to_string())
                };
                let upgrade = value("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
                return Ok(Head {
                    version: value("x-firmware-version"),
                    websocket_key: value("sec-websocket-key").filter(|_| upgrade),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            Ok(httparse::Status::Partial) => {
                return Err(std::io::Error::other("request head too large"))
            }
            Err(e) => return Err(std::io::Error::other(format!("bad request head: {e}"))),
        }
    }
}

async fn connection(
    mut stream: TcpStream,
    config: &BackendConfig,
    stats: &BackendStats,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::other("no request head in time"))??;
    let slow = match (&config.slow_version, &head.version) {
        (Some(slow), Some(v)) => slow.eq_ignore_ascii_case(v),
        _ => false,
    };
    if slow {
        stats.slowed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(config.slow).await;
    }
    let Some(key) = head.websocket_key else {
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\nConnection: close\r\n\r\nbackend ok\n")
            .await?;
        return stream.shutdown().await;
    };
    let accept = derive_accept_key(key.as_bytes());
    stream
        .write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    stats.open.fetch_add(1, Ordering::Relaxed);
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            break;
        }
    }
    stats.open.fetch_sub(1, Ordering::Relaxed);
    Ok(())
}
