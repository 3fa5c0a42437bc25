//! Load generators and the one backend for fwgate's comparative benchmark (`bench/run.sh`).
//!
//! Every subcommand talks to loopback addresses only, and every loop is bounded in count and in
//! time (`--max-secs`). Results are printed as one machine-readable line starting with `RESULT`
//! (key=value pairs); progress markers (`ALL_OPEN`) and errors go to stdout/stderr as noted.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

/// Small WebSocket buffers on both ends (tungstenite's default is 128 KiB each way), so that
/// 10,000 idle connections cost the backend and the client little: the backend's memory is the
/// `direct` column of the idle-memory row.
fn ws_config() -> Option<WebSocketConfig> {
    Some(WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(4096))
}

/// One operation (connect, handshake, ...) may take at most this long before it counts as failed.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(about = "fwgate benchmark load tools (loopback only)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/1.1 200 "ok" (keep-alive) and WebSocket echo; both on every given port (the
    /// Upgrade header decides), so a proxy with a single upstream can front both.
    Backend {
        #[arg(long)]
        http: SocketAddr,
        /// Optional second port (same service).
        #[arg(long)]
        ws: Option<SocketAddr>,
        /// Exit after this long whatever happens.
        #[arg(long, default_value_t = 3600)]
        max_secs: u64,
    },
    /// N WebSocket handshakes (connect, upgrade, close): handshakes/s and latency to the 101.
    Handshakes(OpArgs),
    /// N handshakes the target must refuse (any 4xx/5xx counts as success): rate and latency.
    Refused(OpArgs),
    /// Round trips of echoed messages over C open WebSockets.
    Echo {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value_t = 100)]
        connections: usize,
        /// Messages per connection (sent one at a time: send, wait for the echo).
        #[arg(long, default_value_t = 200)]
        messages: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 60)]
        max_secs: u64,
    },
    /// Open N WebSockets, print `ALL_OPEN`, hold them idle for S seconds, then exit.
    Idle {
        #[command(flatten)]
        conn: ConnArgs,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 30)]
        hold_secs: u64,
        /// Handshakes in flight while opening.
        #[arg(long, default_value_t = 64)]
        open_concurrency: usize,
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
    },
}

#[derive(Args, Clone)]
struct ConnArgs {
    /// host:port of the proxy or backend (loopback only).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value = "/ws")]
    path: String,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Send `X-Device-Id: PREFIX-<n>` with a different n on every connection, like a fleet of
    /// distinct devices (fwgate keys its reconnect backoff and limiters by device id, else by
    /// client IP, and every connection here comes from 127.0.0.1).
    #[arg(long)]
    device_ids: Option<String>,
}

/// Next device number for `--device-ids`.
static DEVICE_SEQ: AtomicUsize = AtomicUsize::new(0);

#[derive(Args, Clone)]
struct OpArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(async move {
        match cli.cmd {
            Cmd::Backend { http, ws, max_secs } => backend(http, ws, max_secs).await,
            Cmd::Handshakes(a) => handshakes(a, false).await,
            Cmd::Refused(a) => handshakes(a, true).await,
            Cmd::Echo { conn, connections, messages, size, max_secs } => {
                echo(conn, connections, messages, size, max_secs).await
            }
            Cmd::Idle { conn, connections, hold_secs, open_concurrency, max_secs } => {
                idle(conn, connections, hold_secs, open_concurrency, max_secs).await
            }
        }
    });
    std::process::exit(code);
}

fn require_loopback(addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        eprintln!("loadtool: {addr} is not a loopback address; refusing");
        std::process::exit(2);
    }
}

// ---------------------------------------------------------------------------------------------
// Backend

async fn backend(http: SocketAddr, ws: Option<SocketAddr>, max_secs: u64) -> i32 {
    let mut addrs = vec![http];
    addrs.extend(ws.filter(|w| *w != http));
    let mut listeners = Vec::new();
    for a in addrs {
        require_loopback(a);
        match TcpListener::bind(a).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("backend: cannot listen on {a}: {e}");
                return 1;
            }
        }
    }
    for l in listeners {
        tokio::spawn(accept_loop(l));
    }
    println!("BACKEND_READY");
    tokio::time::sleep(Duration::from_secs(max_secs)).await;
    0
}

async fn accept_loop(l: TcpListener) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(s), service_fn(serve))
                        .with_upgrades()
                        .await;
                });
            }
            // EMFILE and friends: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn is_ws_upgrade(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn serve(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if !is_ws_upgrade(&req) {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok"))));
    }
    let Some(key) = req.headers().get("sec-websocket-key") else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"missing sec-websocket-key")));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(r);
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(up) = on_upgrade.await {
            let ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, ws_config()).await;
            echo_back(ws).await;
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()))
        .expect("static response"))
}

async fn echo_back<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // A Close from the peer is answered by tungstenite; keep reading until the stream ends so
    // the reply is flushed, then drop (the server closes TCP first, as RFC 6455 asks).
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_binary() || msg.is_text() {
            if ws.send(msg).await.is_err() {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

fn ws_request(c: &ConnArgs) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
    let mut req = format!("ws://{}{}", c.target, c.path)
        .into_client_request()
        .map_err(|e| e.to_string())?;
    for h in &c.headers {
        let (k, v) = h.split_once(':').ok_or_else(|| format!("bad header {h:?}: want 'Name: value'"))?;
        let k = HeaderName::from_bytes(k.trim().as_bytes()).map_err(|e| e.to_string())?;
        let v = HeaderValue::from_str(v.trim()).map_err(|e| e.to_string())?;
        req.headers_mut().append(k, v);
    }
    if let Some(prefix) = &c.device_ids {
        let n = DEVICE_SEQ.fetch_add(1, Ordering::Relaxed);
        let v = HeaderValue::from_str(&format!("{prefix}-{n}")).map_err(|e| e.to_string())?;
        req.headers_mut().insert("x-device-id", v);
    }
    Ok(req)
}

async fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(target).await.map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

async fn open_ws(c: &ConnArgs) -> Result<WebSocketStream<TcpStream>, String> {
    let req = ws_request(c)?;
    let s = connect(c.target).await?;
    let (ws, _resp) = client_async_with_config(req, s, ws_config()).await.map_err(|e| describe(&e))?;
    Ok(ws)
}

fn describe(e: &WsError) -> String {
    match e {
        WsError::Http(r) => format!("handshake answered {}", r.status()),
        other => format!("handshake: {other}"),
    }
}

/// One admitted handshake: latency from connect() to the 101; then a clean close.
async fn one_handshake(c: Arc<ConnArgs>) -> Result<Duration, String> {
    let req = ws_request(&c)?;
    let t0 = Instant::now();
    let s = connect(c.target).await?;
    let (mut ws, _) = client_async_with_config(req, s, ws_config()).await.map_err(|e| describe(&e))?;
    let lat = t0.elapsed();
    let _ = ws.close(None).await;
    while let Some(m) = ws.next().await {
        if m.is_err() {
            break;
        }
    }
    Ok(lat)
}

/// One handshake that must be refused (4xx/5xx): latency from connect() to the answer.
async fn one_refusal(c: Arc<ConnArgs>) -> Result<Duration, String> {
    let req = ws_request(&c)?;
    let t0 = Instant::now();
    let s = connect(c.target).await?;
    match client_async_with_config(req, s, ws_config()).await {
        Err(WsError::Http(r)) if r.status().as_u16() >= 400 => Ok(t0.elapsed()),
        Err(e) => Err(describe(&e)),
        Ok(_) => Err("handshake was admitted (101), expected a refusal".into()),
    }
}

struct Outcome {
    lat_ns: Vec<u64>,
    errors: usize,
    first_error: Option<String>,
}

/// Runs `count` operations with `concurrency` in flight, each bounded by OP_TIMEOUT, the whole
/// bounded by `max_secs`. Returns the latencies, the error count and the elapsed time.
async fn run_ops<F, Fut>(count: usize, concurrency: usize, max_secs: u64, op: F) -> (Outcome, Duration)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Duration, String>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, op) = (next.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome { lat_ns: Vec::new(), errors: 0, first_error: None };
            while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                match tokio::time::timeout(OP_TIMEOUT, op()).await {
                    Ok(Ok(d)) => out.lat_ns.push(d.as_nanos() as u64),
                    Ok(Err(e)) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| "timed out".into());
                    }
                }
            }
            out
        }));
    }
    let mut all = Outcome { lat_ns: Vec::with_capacity(count), errors: 0, first_error: None };
    for t in tasks {
        if let Ok(o) = t.await {
            all.lat_ns.extend(o.lat_ns);
            all.errors += o.errors;
            if all.first_error.is_none() {
                all.first_error = o.first_error;
            }
        }
    }
    (all, t0.elapsed())
}

fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn report(mode: &str, mut o: Outcome, elapsed: Duration) -> i32 {
    o.lat_ns.sort_unstable();
    let ok = o.lat_ns.len();
    let secs = elapsed.as_secs_f64();
    println!(
        "RESULT mode={mode} ok={ok} errors={} secs={secs:.3} rate={:.1} p50_us={:.1} p99_us={:.1} max_us={:.1}",
        o.errors,
        ok as f64 / secs,
        percentile_us(&o.lat_ns, 50.0),
        percentile_us(&o.lat_ns, 99.0),
        percentile_us(&o.lat_ns, 100.0),
    );
    if let Some(e) = o.first_error {
        eprintln!("{mode}: {} errors; first: {e}", o.errors);
    }
    if ok == 0 {
        1
    } else {
        0
    }
}

async fn handshakes(a: OpArgs, refused: bool) -> i32 {
    require_loopback(a.conn.target);
    if let Err(e) = ws_request(&a.conn) {
        eprintln!("{e}");
        return 2;
    }
    let c = Arc::new(a.conn);
    let (o, el) = if refused {
        run_ops(a.count, a.concurrency, a.max_secs, move || one_refusal(c.clone())).await
    } else {
        run_ops(a.count, a.concurrency, a.max_secs, move || one_handshake(c.clone())).await
    };
    report(if refused { "refused" } else { "handshakes" }, o, el)
}

async fn echo(c: ConnArgs, connections: usize, messages: usize, size: usize, max_secs: u64) -> i32 {
    require_loopback(c.target);
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let barrier = Arc::new(tokio::sync::Barrier::new(connections + 1));
    let payload = Bytes::from(vec![0x5au8; size]);
    let c = Arc::new(c);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (c, barrier, payload) = (c.clone(), barrier.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome { lat_ns: Vec::with_capacity(messages), errors: 0, first_error: None };
            let opened = tokio::time::timeout(OP_TIMEOUT, open_ws(&c)).await;
            barrier.wait().await; // every task reaches it, opened or not
            let mut ws = match opened {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    out.errors += 1;
                    out.first_error = Some(e);
                    return out;
                }
                Err(_) => {
                    out.errors += 1;
                    out.first_error = Some("open timed out".into());
                    return out;
                }
            };
            for _ in 0..messages {
                if Instant::now() >= deadline {
                    break;
                }
                let t0 = Instant::now();
                let rt = tokio::time::timeout(OP_TIMEOUT, async {
                    ws.send(Message::Binary(payload.clone())).await.map_err(|e| e.to_string())?;
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Binary(b))) if b.len() == payload.len() => return Ok(()),
                            Some(Ok(Message::Binary(_))) => return Err("echo of the wrong size".to_string()),
                            Some(Ok(_)) => continue,
                            Some(Err(e)) => return Err(e.to_string()),
                            None => return Err("closed".to_string()),
                        }
                    }
                })
                .await;
                match rt {
                    Ok(Ok(())) => out.lat_ns.push(t0.elapsed().as_nanos() as u64),
                    Ok(Err(e)) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                        return out;
                    }
                    Err(_) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| "echo timed out".into());
                        return out;
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
            out
        }));
    }
    barrier.wait().await;
    let t0 = Instant::now();
    let mut all = Outcome { lat_ns: Vec::new(), errors: 0, first_error: None };
    for t in tasks {
        if let Ok(o) = t.await {
            all.lat_ns.extend(o.lat_ns);
            all.errors += o.errors;
            if all.first_error.is_none() {
                all.first_error = o.first_error;
            }
        }
    }
    // The elapsed time includes the closes, which are cheap next to the round trips.
    report("echo", all, t0.elapsed())
}

async fn idle(c: ConnArgs, connections: usize, hold_secs: u64, open_concurrency: usize, max_secs: u64) -> i32 {
    require_loopback(c.target);
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let c = Arc::new(c);
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let held: Arc<Mutex<Vec<WebSocketStream<TcpStream>>>> = Arc::new(Mutex::new(Vec::with_capacity(connections)));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut tasks = Vec::new();
    for _ in 0..open_concurrency.max(1) {
        let (c, next, held, failed, first_error) =
            (c.clone(), next.clone(), held.clone(), failed.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < connections && Instant::now() < deadline {
                match tokio::time::timeout(OP_TIMEOUT, open_ws(&c)).await {
                    Ok(Ok(ws)) => held.lock().unwrap().push(ws),
                    Ok(Err(e)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert_with(|| "open timed out".into());
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let open = held.lock().unwrap().len();
    let failed = failed.load(Ordering::Relaxed);
    println!("ALL_OPEN open={open} failed={failed} secs={:.3}", t0.elapsed().as_secs_f64());
    if let Some(e) = first_error.lock().unwrap().take() {
        eprintln!("idle: {failed} failed; first: {e}");
    }
    let remaining = deadline.saturating_duration_since(Instant::now());
    tokio::time::sleep(Duration::from_secs(hold_secs).min(remaining)).await;
    println!("RESULT mode=idle open={open} failed={failed}");
    if open == 0 {
        1
    } else {
        0
    }
}
