//! Shared test fixtures: backends, the proxy under test, raw clients, and `eventually`.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use fwgate::admin::AdminToken;
use fwgate::config::Config;
use fwgate::gate::Gate;
use fwgate::metrics::Metrics;
use fwgate::rules::file;
use fwgate::Listeners;

/// Deadline for every wait in these tests.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `check` until it returns true or the deadline passes; panics with `what` on timeout.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > until {
            let logs = captured_logs();
            let tail: Vec<&str> = logs
                .lines()
                .filter(|l| !l.contains("fwgate::access"))
                .rev()
                .take(30)
                .collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "timed out after {DEADLINE:?} waiting for: {what}\nlast proxy log lines, access log omitted (all tests in this process):\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP backend. Paths: `/headers` echoes request headers as `name: value` lines;
/// `/upload` answers the number of body bytes received; `/stream/N` streams N bytes in 64 KiB
/// chunks; `/status/N` answers status N; anything else answers "backend ok".
pub struct HttpBackend {
    pub addr: SocketAddr,
    /// TCP connections accepted (refused handshakes must not move this).
    pub connections: Arc<AtomicUsize>,
    /// Requests served.
    pub requests: Arc<AtomicUsize>,
}

pub async fn http_backend() -> HttpBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    r.fetch_add(1, Ordering::SeqCst);
                    backend_handle(req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    HttpBackend {
        addr,
        connections,
        requests,
    }
}

impl HttpBackend {
    /// TCP connections the backend accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Requests the backend served so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl WsBackend {
    /// TCP connections the backend accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

type BackendBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn backend_handle(req: Request<Incoming>) -> Result<Response<BackendBody>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/headers" {
        let mut out = String::new();
        for (k, v) in req.headers() {
            out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        return Ok(Response::new(Full::new(Bytes::from(out)).boxed()));
    }
    if path.starts_with("/echo") {
        // The request target exactly as the backend received it.
        let target = req.uri().path_and_query().map_or("", |p| p.as_str());
        return Ok(Response::new(
            Full::new(Bytes::from(target.to_string())).boxed(),
        ));
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            if let Ok(f) = frame {
                if let Some(d) = f.data_ref() {
                    n += d.len();
                }
            }
        }
        return Ok(Response::new(Full::new(Bytes::from(n.to_string())).boxed()));
    }
    if let Some(n) = path.strip_prefix("/stream/") {
        let total: usize = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let chunks = (0..total.div_ceil(chunk.len())).map(move |i| {
            let len = chunk.len().min(total - i * chunk.len());
            Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
        });
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    if let Some(n) = path.strip_prefix("/drip/") {
        // N chunks of 1 KiB, 50 ms apart: a long-running streamed response.
        let n: usize = n.parse().unwrap_or(0);
        let chunks = futures_util::stream::unfold(0usize, move |i| async move {
            if i >= n {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'd'; 1024]))),
                i + 1,
            ))
        });
        return Ok(Response::new(BodyExt::boxed(StreamBody::new(chunks))));
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(Response::new(
            Full::new(Bytes::from_static(b"delayed ok")).boxed(),
        ));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"status")).boxed());
        *resp.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return Ok(resp);
    }
    Ok(Response::new(
        Full::new(Bytes::from_static(b"backend ok")).boxed(),
    ))
}

/// A WebSocket echo backend (text, binary, ping/pong, close) counting its connections.
pub struct WsBackend {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
}

pub async fn ws_backend() -> WsBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let c = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    WsBackend { addr, connections }
}

/// The proxy under test, running in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gate: Arc<Gate>,
    pub dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub const TEST_TOKEN: &str = "test-token-123";

/// Starts fwgate with `rules` (rules.toml text) in front of `upstream`. `extra` is appended to
/// fwgate.toml (e.g. an `[upstream]` table with timeouts).
pub async fn start_proxy(rules: &str, upstream: SocketAddr, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    start_proxy_in(dir, upstream, extra).await
}

/// Starts fwgate in an existing directory (rules.toml and any state already there): a restart.
pub async fn start_proxy_in(dir: tempfile::TempDir, upstream: SocketAddr, extra: &str) -> Proxy {
    init_log_capture();
    // Top-level keys in `extra` (before its first table) must precede every table.
    let split = extra
        .find("\n[")
        .map(|i| i + 1)
        .unwrap_or(if extra.starts_with('[') {
            0
        } else {
            extra.len()
        });
    let (top, tables) = extra.split_at(split);
    let upstream_table = if tables.contains("[upstream]") {
        tables.replace("[upstream]", &format!("[upstream]\naddr = \"{upstream}\""))
    } else {
        format!("[upstream]\naddr = \"{upstream}\"\n{tables}")
    };
    // A short grace keeps test shutdowns quick when tunnels are still open.
    let grace = if top.contains("shutdown_grace") {
        ""
    } else {
        "shutdown_grace = \"1s\"\n"
    };
    // `# no state_dir` in `extra` runs without one (kill-switch entries cannot be created).
    let state = if extra.contains("# no state_dir") {
        ""
    } else {
        "state_dir = \"state\"\n"
    };
    let config_text = format!("rules = \"rules.toml\"\n{state}{grace}{top}{upstream_table}\n");
    std::fs::write(dir.path().join("fwgate.toml"), &config_text).unwrap();
    let config = Config::load(&dir.path().join("fwgate.toml"))
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{config_text}"));
    let metrics = Arc::new(Metrics::new());
    let rule_set = file::load(config.rules_path.as_ref().unwrap(), &metrics, 1)
        .unwrap_or_else(|e| panic!("test rules invalid:\n{e}"));
    let gate = Arc::new(
        Gate::new(config, rule_set, metrics)
            .unwrap_or_else(|e| panic!("proxy refused to start: {e}")),
    );
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tls = fwgate::TlsListener::from_config(&gate.config)
        .unwrap_or_else(|e| panic!("test TLS invalid: {e}"));
    // `# no admin token` in `extra` runs with none configured (mutating endpoints answer 403).
    let token = if extra.contains("# no admin token") {
        AdminToken::none()
    } else {
        AdminToken::new(TEST_TOKEN)
    };
    let task = tokio::spawn(fwgate::run(
        Listeners { proxy, admin, tls },
        gate.clone(),
        token,
        async move {
            let _ = rx.await;
        },
    ));
    Proxy {
        addr,
        admin: admin_addr,
        gate,
        dir,
        shutdown: Some(tx),
        task: Some(task),
    }
}

impl Proxy {
    pub fn rules_path(&self) -> PathBuf {
        self.dir.path().join("rules.toml")
    }

    /// Stops the proxy, keeping its directory for a restart.
    pub async fn stop_keep_dir(mut self) -> tempfile::TempDir {
        self.shutdown_and_wait().await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Stops the proxy and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown_and_wait().await;
    }

    async fn shutdown_and_wait(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("proxy did not stop in time")
                .unwrap();
        }
    }
}

/// A raw HTTP/1.1 exchange over a fresh TCP connection: sends `request` verbatim and reads the
/// whole response (the request should say `Connection: close`).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("response not complete in time")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A simple GET with extra headers, over a fresh connection; returns (status, headers, body).
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: devices.test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let resp = raw_exchange(addr, req.as_bytes()).await;
    split_response(&resp)
}

pub fn split_response(resp: &str) -> (u16, String, String) {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in response: {resp:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// Reads one header value (lower-cased head from [`split_response`]).
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}

/// GET on the admin listener; returns (status, body).
pub async fn admin_get(proxy: &Proxy, path: &str) -> (u16, String) {
    let (s, _, b) = get(proxy.admin, path, &[]).await;
    (s, b)
}

/// POST on the admin listener with an optional bearer token and body; returns (status, body).
pub async fn admin_post(
    proxy: &Proxy,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    admin_request(proxy, "POST", path, token, body).await
}

pub async fn admin_request(
    proxy: &Proxy,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (s, _, b) = split_response(&raw_exchange(proxy.admin, req.as_bytes()).await);
    (s, b)
}

/// The value of one sample line in /metrics (exact series text before the value).
pub async fn metric(proxy: &Proxy, series: &str) -> Option<f64> {
    let (_, body) = admin_get(proxy, "/metrics").await;
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Everything tracing wrote in this test process (access log included).
pub fn captured_logs() -> String {
    let buf = LOGS
        .get()
        .map(|b| b.lock().unwrap().clone())
        .unwrap_or_default();
    String::from_utf8_lossy(&buf).into_owned()
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_log_capture() {
    let mut first = false;
    let buf = LOGS.get_or_init(|| {
        first = true;
        Arc::new(Mutex::new(Vec::new()))
    });
    if first {
        let sink = LogSink(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .fmt_fields(fwgate::logging::EscapedFields)
            .with_writer(move || sink.clone())
            .try_init();
    }
    let _ = std::io::stderr().flush();
}

/// Connects a WebSocket client through the proxy with extra handshake headers.
pub async fn ws_connect(
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    ws_handshake(stream, proxy, path, headers).await
}

/// A WebSocket handshake on an open connection to `proxy`, with extra headers, bounded by
/// [`DEADLINE`].
async fn ws_handshake(
    stream: TcpStream,
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{proxy}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    tokio::time::timeout(DEADLINE, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("websocket handshake timed out")
        .map(|(ws, _)| ws)
}

/// A TCP connection to `addr` from the loopback address `source` (e.g. 127.0.0.2): a second
/// client address on one machine.
pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    tokio::time::timeout(DEADLINE, socket.connect(addr))
        .await
        .expect("connect timed out")
        .unwrap()
}

/// [`ws_connect`] from the loopback address `source`; the error keeps the refusal's status.
pub async fn ws_connect_from(
    source: std::net::IpAddr,
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let stream = connect_from(source, proxy).await;
    ws_handshake(stream, proxy, path, headers).await
}

/// The status a WebSocket handshake got: 101, or the refusal's status.
pub fn handshake_status<S>(result: &Result<S, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match result {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
    }
}

/// Runs the `fwgate` binary with `args` off the runtime's threads (with the test token in
/// `FWGATE_ADMIN_TOKEN`, no `FWGATE_CONFIG`); returns (success, stdout then stderr).
pub async fn run_fwgate(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fwgate"))
            .args(&args)
            .env("FWGATE_ADMIN_TOKEN", TEST_TOKEN)
            .env_remove("FWGATE_CONFIG")
            .output()
            .expect("run fwgate");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .expect("fwgate runner")
}
