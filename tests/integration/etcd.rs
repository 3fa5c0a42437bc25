//! A real etcd for the fleet tests: started on 127.0.0.1 with free ports and a temporary data
//! directory (on /dev/shm when there is one: etcd fsyncs every write), stopped on drop. Tests
//! skip loudly when the `etcd` binary is missing. Also a TCP relay that can cut one instance
//! off from etcd, and raw JSON calls to etcd's gateway for what the tests do behind fwgate's back.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use crate::util::{raw_exchange, split_response, DEADLINE};

/// Whether `etcd` can be run here; says why a test is skipped when not, on the real stderr
/// (not the test harness's captured output, so the skip shows even when the test passes).
pub fn available(test: &str) -> bool {
    match Command::new("etcd").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: the etcd binary is not installed (apt-get install etcd-server); the fleet tests need a real etcd"
            );
            false
        }
    }
}

/// A port for etcd that nothing else in this machine's tests can be handed meanwhile. A port
/// from `bind(":0")` is released before etcd binds it, and the kernel may give it to any other
/// socket in between (every proxy, backend and client connection in the suite takes ports from
/// the ephemeral range), and again while a test has etcd stopped to simulate an outage. Ports
/// below the ephemeral range (32768 and up on Linux) are only ever taken by an explicit bind,
/// so each test process walks its own stretch of them, skipping any that is busy.
fn reserved_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 120) * 100;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range for etcd");
}

/// One etcd member.
pub struct Etcd {
    pub client: SocketAddr,
    peer: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
}

impl Etcd {
    /// Starts etcd and waits until it is healthy.
    pub async fn start() -> Etcd {
        Etcd::start_with(&[]).await
    }

    /// Starts etcd with extra flags (e.g. TLS), waiting until `/health` answers over plain HTTP
    /// when `health_check` flags allow it.
    pub async fn start_with(extra: &[&str]) -> Etcd {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("fwgate-etcd")
                .tempdir_in("/dev/shm")
                .unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let mut etcd = Etcd {
            client: SocketAddr::from(([127, 0, 0, 1], reserved_port())),
            peer: reserved_port(),
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        etcd.spawn();
        if etcd.extra.is_empty() {
            etcd.wait_healthy().await;
        }
        etcd
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    fn spawn(&mut self) {
        let scheme = if self.extra.iter().any(|f| f == "--cert-file") {
            "https"
        } else {
            "http"
        };
        let client = format!("{scheme}://{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new("etcd")
            .args([
                "--name",
                "t",
                "--data-dir",
                self.dir.path().join("data").to_str().unwrap(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("t={peer}"),
                "--initial-cluster-state",
                "new",
                "--log-level",
                "warn",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
    }

    /// Waits until `/health` says true (plain HTTP only).
    pub async fn wait_healthy(&self) {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(self.client)).await
            {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let req = "GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n";
                if s.write_all(req.as_bytes()).await.is_ok() {
                    let mut out = Vec::new();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out)).await;
                    if String::from_utf8_lossy(&out).contains("\"health\":\"true\"") {
                        return;
                    }
                }
            }
            if tokio::time::Instant::now() > until {
                panic!(
                    "etcd did not become healthy within {DEADLINE:?}; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// etcd's own log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills etcd (as a crash would), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        if self.extra.is_empty() {
            self.wait_healthy().await;
        }
    }

    /// A raw JSON call to the gateway (plain HTTP); returns the answer.
    pub async fn call(&self, path: &str, body: Value) -> Value {
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, _, text) = split_response(&raw_exchange(self.client, req.as_bytes()).await);
        let text = dechunk(&text);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("etcd {path} answered {status}: {text:?} ({e})"))
    }

    /// Writes a key behind fwgate's back.
    pub async fn put(&self, key: &str, value: &[u8]) -> i64 {
        let v = self
            .call(
                "/v3/kv/put",
                json!({"key": b64(key.as_bytes()), "value": b64(value)}),
            )
            .await;
        v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("put failed: {v}"))
    }

    /// Every key and value under `prefix`, decoded.
    pub async fn range_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(prefix.as_bytes()), "range_end": b64(&end)}),
            )
            .await;
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        (
                            unb64(kv["key"].as_str().unwrap_or("")),
                            unb64(kv["value"].as_str().unwrap_or("")),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The store's current revision.
    pub async fn revision(&self) -> i64 {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(b"/"), "count_only": true}),
            )
            .await;
        v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap()
    }

    /// Compacts away every revision before the current one.
    pub async fn compact(&self) -> i64 {
        let rev = self.revision().await;
        let v = self
            .call(
                "/v3/kv/compaction",
                json!({"revision": rev.to_string(), "physical": true}),
            )
            .await;
        assert!(v.get("error").is_none(), "compaction failed: {v}");
        rev
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> String {
    String::from_utf8_lossy(
        &base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap_or_default(),
    )
    .into_owned()
}

/// Undoes chunked transfer encoding when the gateway used it.
fn dechunk(body: &str) -> String {
    let trimmed = body.trim_start();
    if trimmed.starts_with('{') {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// One connection through the relay.
struct RelayConn {
    /// Holds back everything etcd sends on it (the connection stays open: a stall).
    frozen: Arc<AtomicBool>,
    /// It carries a watch (its first request is `POST /v3/watch`).
    watch: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// A TCP relay in front of etcd for one instance: `cut` drops every connection through it and
/// refuses new ones until `restore`; `freeze_watches` makes the open watch streams go silent
/// while everything else keeps working.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<RelayConn>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn relay_conn(
    inbound: TcpStream,
    target: SocketAddr,
    frozen: Arc<AtomicBool>,
    watch: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(out) = TcpStream::connect(target).await else {
        return;
    };
    let (mut from_client, mut to_client) = inbound.into_split();
    let (mut from_etcd, mut to_etcd) = out.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut first = true;
        loop {
            let n = from_client.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            if first && buf[..n].starts_with(b"POST /v3/watch") {
                watch.store(true, Ordering::SeqCst);
            }
            first = false;
            to_etcd.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from_etcd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            while frozen.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            to_client.write_all(&buf[..n]).await?;
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<RelayConn>>> = Arc::default();
        let task = tokio::spawn({
            let (open, conns) = (open.clone(), conns.clone());
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !open.load(Ordering::SeqCst) {
                        continue;
                    }
                    let frozen = Arc::new(AtomicBool::new(false));
                    let watch = Arc::new(AtomicBool::new(false));
                    let task =
                        tokio::spawn(relay_conn(inbound, target, frozen.clone(), watch.clone()));
                    conns.lock().unwrap().push(RelayConn {
                        frozen,
                        watch,
                        task,
                    });
                }
            }
        });
        Relay {
            addr,
            open,
            conns,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.task.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Silences the watch streams open now (they stay connected); returns how many.
    pub fn freeze_watches(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for c in conns.iter().filter(|c| c.watch.load(Ordering::SeqCst)) {
            if !c.task.is_finished() {
                c.frozen.store(true, Ordering::SeqCst);
                n += 1;
            }
        }
        n
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Throwaway certificates for etcd over TLS: a CA, a server certificate for 127.0.0.1, and a
/// client certificate, written as PEM files into `dir`.
pub struct Pki {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

impl Pki {
    pub fn write(dir: &std::path::Path) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fwgate etcd test CA");
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let issue = |cn: &str, sans: &[&str]| {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            (
                params.signed_by(&key, &issuer).unwrap().pem(),
                key.serialize_pem(),
            )
        };
        let (server_cert, server_key) = issue("etcd", &["127.0.0.1", "localhost"]);
        let (client_cert, client_key) = issue("fwgate", &[]);
        let path = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        Pki {
            ca: path("ca.pem", &ca_pem),
            server_cert: path("server.pem", &server_cert),
            server_key: path("server-key.pem", &server_key),
            client_cert: path("client.pem", &client_cert),
            client_key: path("client-key.pem", &client_key),
        }
    }
}
