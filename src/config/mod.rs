//! Process settings (`fwgate.toml`): listeners, upstream, admin, logging, file locations.
//!
//! Two stages: [`RawConfig`] mirrors the file (`deny_unknown_fields`, so a typo is an error, not
//! a silently ignored key), then [`Config::from_toml`] validates everything at once and resolves
//! relative paths against the config file's directory. The rest of the crate sees only [`Config`].
//! The rules file, which operators edit and fwgate hot-reloads, is [`crate::rules::file`].

pub mod fleet;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::diag::{FileError, FileErrors};
use crate::duration::parse_duration;
use crate::limits::backoff::{BackoffConfig, BackoffKey};
use crate::limits::{Rate, DEFAULT_MAX_KEYS};
use ipnet::IpNet;

pub use fleet::{EtcdEndpoint, FleetConfig};

/// Where devices connect when no config says otherwise.
pub const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:8080";
/// The backend fwgate protects when no config says otherwise.
pub const DEFAULT_UPSTREAM_ADDR: &str = "127.0.0.1:9000";
/// Loopback only: the admin API can change what the fleet may do.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9901";
/// How long to wait for a TCP connection to the backend before answering 504.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the backend's response head before answering 504 (nginx's proxy_read_timeout).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle pooled backend connection is kept for reuse.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle backend connections kept for reuse; bounds file descriptors held for nothing.
pub const DEFAULT_POOL_MAX_IDLE: usize = 256;
/// Slowloris bound: a client must send its whole request head within this time.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the next bytes of a request body (nginx's `client_body_timeout`): shorter
/// than the backend's response timeout, so a stalled upload frees its backend connection first.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the bytes of one request head (request line plus headers); over it the answer is 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Refusal access-log lines per second before lines are sampled (a storm must not flood the log).
pub const DEFAULT_REFUSAL_LOG_PER_SECOND: u32 = 50;

/// Header lines per request (hyper's default is 100).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Request-target bytes before 414 (nginx's large_client_header_buffers is 8k).
pub const DEFAULT_MAX_URI_BYTES: usize = 8192;
/// Idle tunnels are closed after this (devices ping far more often; dead peers must not leak).
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Kernel accept backlog.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Open sockets before accept pauses (keep LimitNOFILE above it).
pub const DEFAULT_MAX_OPEN_CONNECTIONS: usize = 100_000;
/// Shutdown: time for in-flight requests, and the spread of tunnel closures.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// More worker threads than this is a typo, not a machine.
pub const MAX_WORKERS: usize = 1024;

/// Backend connects in progress at once before new handshakes get 503 (a dead backend must not
/// pile up sockets).
pub const DEFAULT_MAX_PENDING_CONNECTS: usize = 512;
/// Base Retry-After of refusals by process-wide limits (jittered).
pub const DEFAULT_LIMIT_RETRY_AFTER: Duration = Duration::from_secs(10);

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 0,
            handshake_rate: None,
            per_ip_rate: None,
            max_keys: DEFAULT_MAX_KEYS,
            retry_after: DEFAULT_LIMIT_RETRY_AFTER,
            jitter: 0.5,
            backoff: BackoffConfig::default(),
        }
    }
}

/// The configuration fwgate runs with when started without `--config`: listen on 8080, forward
/// to 127.0.0.1:9000, admit everything. Deliberately minimal and safe.
pub const EMBEDDED_CONFIG: &str = r#"# built-in default configuration (fwgate run without --config)
[listen]
addr = "0.0.0.0:8080"
[upstream]
addr = "127.0.0.1:9000"
[admin]
addr = "127.0.0.1:9901"
"#;

/// `fwgate.toml` exactly as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Path of the rules file; relative to this file's directory. Default: embedded admit-all rules.
    pub rules: Option<Spanned<String>>,
    /// Directory for persisted state (kill-switch entries); relative to this file's directory.
    pub state_dir: Option<Spanned<String>>,
    /// The device-facing listener.
    #[serde(default)]
    pub listen: RawListen,
    /// The backend.
    #[serde(default)]
    pub upstream: RawUpstream,
    /// The admin listener.
    #[serde(default)]
    pub admin: RawAdmin,
    /// Logging.
    #[serde(default)]
    pub log: RawLog,
    /// Process-wide admission limits.
    #[serde(default)]
    pub limits: RawLimits,
    /// TLS termination on the device listener.
    pub tls: Option<RawTls>,
    /// On SIGTERM/SIGINT: how long in-flight requests may finish and over how long open tunnels
    /// are closed, e.g. `"30s"`. Default 30s.
    pub shutdown_grace: Option<Spanned<String>>,
    /// Worker threads; 0 or absent: one per CPU (or `TOKIO_WORKER_THREADS`). 1 runs
    /// everything on one thread with tokio's single-threaded scheduler.
    pub workers: Option<Spanned<i64>>,
    /// Fleet mode: kill-switch entries (and optionally the rules) shared through etcd.
    pub fleet: Option<fleet::RawFleet>,
}

/// `[tls]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain (leaf first); relative to this file. Watched and reloaded.
    pub cert: Spanned<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Watched and reloaded.
    pub key: Spanned<String>,
    /// PEM CA bundle for verifying client certificates (enables mTLS).
    pub client_ca: Option<Spanned<String>>,
    /// Refuse clients without a valid certificate (default false: verify when presented).
    pub require_client_cert: Option<bool>,
}

/// `[limits]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Open device connections allowed at once; more get 503 at accept. Default 0 (unlimited).
    pub max_connections: Option<Spanned<i64>>,
    /// Admissions per period for the whole process, e.g. `"2000/s"`. Default unlimited.
    pub handshake_rate: Option<Spanned<String>>,
    /// Requests per period from one client IP, e.g. `"20/s"`. Default unlimited.
    pub per_ip_rate: Option<Spanned<String>>,
    /// Keys kept per keyed limiter (and by the backoff). Default 1000000.
    pub max_keys: Option<Spanned<i64>>,
    /// Base Retry-After of refusals by these limits, e.g. `"10s"`.
    pub retry_after: Option<Spanned<String>>,
    /// Spread of that Retry-After (0-1). Default 0.5.
    pub jitter: Option<Spanned<f64>>,
    /// Reconnect backoff.
    #[serde(default)]
    pub backoff: RawBackoff,
}

/// `[limits.backoff]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    /// Default true.
    pub enabled: Option<bool>,
    /// Refusals/disconnects per window before a penalty. Default 10.
    pub threshold: Option<Spanned<i64>>,
    /// Counting window. Default `"60s"`.
    pub window: Option<Spanned<String>>,
    /// First penalty. Default `"5s"`.
    pub base: Option<Spanned<String>>,
    /// Longest penalty. Default `"5m"`.
    pub max: Option<Spanned<String>>,
    /// Quiet time after which a device starts over. Default `"5m"`.
    pub quiet: Option<Spanned<String>>,
    /// What identifies a device: `"device"` (device id + client address; default) or `"ip"`.
    pub key: Option<Spanned<String>>,
    /// A tunnel ending on its own sooner than this after opening is churn. Default `"10s"`.
    pub short_tunnel: Option<Spanned<String>>,
}

/// `[listen]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// `host:port` to accept devices on. Default `0.0.0.0:8080`.
    pub addr: Option<Spanned<String>>,
    /// Time allowed to receive a whole request head, e.g. `"10s"`.
    pub header_read_timeout: Option<Spanned<String>>,
    /// Longest wait between two reads of a request body, e.g. `"30s"`; past it 408. Default 30s.
    pub body_read_timeout: Option<Spanned<String>>,
    /// How long a keep-alive connection may sit idle between a response and the first byte of
    /// the next request, e.g. `"75s"`. Default: `header_read_timeout` (as HAProxy's
    /// `timeout http-keep-alive` defaults to `timeout http-request`).
    pub keepalive_timeout: Option<Spanned<String>>,
    /// Open connections from one client address at once (0: no cap, the default: many devices
    /// share an address behind NAT). Past it a connection is refused at accept.
    pub max_connections_per_ip: Option<Spanned<i64>>,
    /// Maximum bytes in a request head (at least 8192). Default 16384.
    pub max_header_bytes: Option<Spanned<i64>>,
    /// Maximum header lines in a request. Default 100.
    pub max_headers: Option<Spanned<i64>>,
    /// Maximum bytes of the request target (path and query); longer gets 414. Default 8192.
    pub max_uri_bytes: Option<Spanned<i64>>,
    /// A tunnel with no byte either way for this long is closed, e.g. `"1h"`. Default 1h.
    pub tunnel_idle_timeout: Option<Spanned<String>>,
    /// Kernel accept backlog. Default 1024.
    pub backlog: Option<Spanned<i64>>,
    /// Hard cap on open sockets: past it, accept pauses (the kernel backlog absorbs, then refuses). Default 100000.
    pub max_open_connections: Option<Spanned<i64>>,
    /// Expect a PROXY protocol v1/v2 header on every connection (from `trusted_proxies` only).
    pub proxy_protocol: Option<bool>,
    /// Serve plain-TCP WebSocket handshakes on fwgate's own HTTP/1.1 path (default true);
    /// false sends every request through hyper.
    pub fast_path: Option<bool>,
    /// Networks allowed to send PROXY headers, e.g. `["10.0.0.0/8"]`. Others are refused.
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    /// Networks whose `X-Forwarded-For` is believed (e.g. the load balancer's).
    pub trusted_forwarders: Option<Vec<Spanned<String>>>,
}

/// `[upstream]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `host:port` of the backend. Default `127.0.0.1:9000`.
    pub addr: Option<Spanned<String>>,
    /// TCP connect timeout, e.g. `"5s"`; past it the client gets 504.
    pub connect_timeout: Option<Spanned<String>>,
    /// Time to the backend's response head, e.g. `"60s"`; past it the client gets 504.
    pub response_timeout: Option<Spanned<String>>,
    /// How long idle pooled connections are kept, e.g. `"90s"`.
    pub pool_idle_timeout: Option<Spanned<String>>,
    /// How many idle pooled connections are kept. Default 256.
    pub pool_max_idle: Option<Spanned<i64>>,
    /// Exchanges (in-flight requests + open tunnels) to the backend at once; more get 503. Default 0 (unlimited).
    pub max_connections: Option<Spanned<i64>>,
    /// TCP connects to the backend in progress at once; more get 503 at once. Default 512.
    pub max_pending_connects: Option<Spanned<i64>>,
    /// Speak TLS to the backend. Default false.
    pub tls: Option<bool>,
    /// PEM CA bundle the backend's certificate must chain to (required with `tls = true`).
    pub ca_file: Option<Spanned<String>>,
    /// Name to send as SNI and verify the certificate against. Default: the host part of `addr`.
    pub server_name: Option<Spanned<String>>,
}

/// `[admin]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `host:port` of the admin API. Default `127.0.0.1:9901` (loopback).
    pub addr: Option<Spanned<String>>,
    /// File holding the bearer token for mutating endpoints (or set `FWGATE_ADMIN_TOKEN`).
    pub token_file: Option<Spanned<String>>,
}

/// `[log]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `"text"` (default) or `"json"`.
    pub format: Option<Spanned<String>>,
    /// Whether to write one access-log line per decision. Default true.
    pub access: Option<bool>,
    /// Refusal lines per second before sampling starts. Default 50.
    pub refusal_lines_per_second: Option<Spanned<i64>>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable key=value lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Validated process configuration; every field has its final value.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (None for the embedded default).
    pub source: Option<PathBuf>,
    /// The rules file to load and watch (None: the embedded admit-all rules).
    pub rules_path: Option<PathBuf>,
    /// Where kill-switch state is persisted (None: kept in memory only, with a warning).
    pub state_dir: Option<PathBuf>,
    /// Device-facing listener settings.
    pub listen: ListenConfig,
    /// Backend settings.
    pub upstream: UpstreamConfig,
    /// Admin API settings.
    pub admin: AdminConfig,
    /// Logging settings.
    pub log: LogConfig,
    /// Process-wide limits.
    pub limits: LimitsConfig,
    /// Graceful shutdown period.
    pub shutdown_grace: Duration,
    /// Worker threads as configured (0: automatic, see [`Config::worker_threads`]).
    pub workers: usize,
    /// TLS on the device listener, if configured.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Fleet mode (`[fleet]`), if configured.
    pub fleet: Option<FleetConfig>,
}

/// Validated `[listen]`.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// Address to bind for devices.
    pub addr: SocketAddr,
    /// Time allowed to receive a request head.
    pub header_read_timeout: Duration,
    /// Longest wait between two reads of a request body (zero: none).
    pub body_read_timeout: Duration,
    /// Longest idle time of a keep-alive connection between requests.
    pub keepalive_timeout: Duration,
    /// Open connections per client address (0: no cap).
    pub max_connections_per_ip: usize,
    /// Maximum request-head size in bytes.
    pub max_header_bytes: usize,
    /// Maximum header lines.
    pub max_headers: usize,
    /// Maximum request-target bytes.
    pub max_uri_bytes: usize,
    /// Idle tunnel timeout (zero: none).
    pub tunnel_idle_timeout: Duration,
    /// Accept backlog.
    pub backlog: u32,
    /// Hard cap on open sockets before accept pauses.
    pub max_open_connections: usize,
    /// PROXY protocol expected.
    pub proxy_protocol: bool,
    /// Upgrade handshakes on plain TCP take the HTTP/1.1 fast path.
    pub fast_path: bool,
    /// Who may send PROXY headers.
    pub trusted_proxies: Vec<IpNet>,
    /// Whose `X-Forwarded-For` is believed.
    pub trusted_forwarders: Vec<IpNet>,
}

/// Validated `[upstream]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Backend address as written (`host:port`); a name is looked up on each connect.
    pub addr: String,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time to the response head.
    pub response_timeout: Duration,
    /// Idle pooled connection lifetime.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept.
    pub pool_max_idle: usize,
    /// Concurrent backend exchanges (0: unlimited).
    pub max_connections: usize,
    /// Concurrent backend connects in progress.
    pub max_pending_connects: usize,
    /// TLS to the backend: (CA file, server name).
    pub tls: Option<(PathBuf, String)>,
}

/// Validated `[limits]`.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Open device connections (0: unlimited).
    pub max_connections: usize,
    /// Global admission rate.
    pub handshake_rate: Option<Rate>,
    /// Per-IP request rate.
    pub per_ip_rate: Option<Rate>,
    /// Keys per keyed limiter.
    pub max_keys: usize,
    /// Base Retry-After of global refusals.
    pub retry_after: Duration,
    /// Its spread.
    pub jitter: f64,
    /// Reconnect backoff.
    pub backoff: BackoffConfig,
}

/// Validated `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind the admin API.
    pub addr: SocketAddr,
    /// Token file, if configured (the token itself is read at start and never logged).
    pub token_file: Option<PathBuf>,
}

/// Validated `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// Access log on or off.
    pub access: bool,
    /// Refusal lines per second before sampling.
    pub refusal_lines_per_second: u32,
}

impl Config {
    /// How many worker threads to run: `workers` when set, else `TOKIO_WORKER_THREADS` (tokio's
    /// own convention), else one per CPU. `env` is that variable's value.
    pub fn worker_threads(&self, env: Option<&str>) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        env.and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| (1..=MAX_WORKERS).contains(n))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The embedded default configuration.
    pub fn embedded() -> Config {
        // The embedded text is a constant checked by a unit test, so this cannot fail at runtime;
        // fall back to a hand-built value anyway rather than panic.
        Config::from_toml(EMBEDDED_CONFIG, None).unwrap_or_else(|_| Config {
            source: None,
            rules_path: None,
            state_dir: None,
            listen: ListenConfig {
                addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
                header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
                body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
                keepalive_timeout: DEFAULT_HEADER_READ_TIMEOUT,
                max_connections_per_ip: 0,
                max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
                max_headers: DEFAULT_MAX_HEADERS,
                max_uri_bytes: DEFAULT_MAX_URI_BYTES,
                tunnel_idle_timeout: DEFAULT_TUNNEL_IDLE_TIMEOUT,
                backlog: DEFAULT_BACKLOG,
                max_open_connections: DEFAULT_MAX_OPEN_CONNECTIONS,
                proxy_protocol: false,
                fast_path: true,
                trusted_proxies: Vec::new(),
                trusted_forwarders: Vec::new(),
            },
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            workers: 0,
            tls: None,
            fleet: None,
            upstream: UpstreamConfig {
                addr: DEFAULT_UPSTREAM_ADDR.to_string(),
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                response_timeout: DEFAULT_RESPONSE_TIMEOUT,
                pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
                pool_max_idle: DEFAULT_POOL_MAX_IDLE,
                max_connections: 0,
                max_pending_connects: DEFAULT_MAX_PENDING_CONNECTS,
                tls: None,
            },
            limits: LimitsConfig::default(),
            admin: AdminConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 9901)),
                token_file: None,
            },
            log: LogConfig {
                format: LogFormat::Text,
                access: true,
                refusal_lines_per_second: DEFAULT_REFUSAL_LOG_PER_SECOND,
            },
        })
    }

    /// Reads and validates a config file, reporting every problem with file:line:column.
    pub fn load(path: &Path) -> Result<Config, FileErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| FileError::whole(path, format!("cannot read config file: {e}")))?;
        Config::from_toml(&text, Some(path))
    }

    /// Validates config text; `path` names the file in errors and anchors relative paths.
    pub fn from_toml(text: &str, path: Option<&Path>) -> Result<Config, FileErrors> {
        let shown = path.unwrap_or(Path::new("<embedded fwgate.toml>"));
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| FileError::from_toml(shown, text, &e))?;
        let base = path
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut errors = Vec::new();
        let mut v = Validator {
            path: shown,
            text,
            errors: &mut errors,
        };

        let header_read_timeout =
            v.duration(&raw.listen.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        let keepalive_timeout = v.duration(&raw.listen.keepalive_timeout, header_read_timeout);
        if let (Some(s), true) = (&raw.listen.keepalive_timeout, keepalive_timeout.is_zero()) {
            v.error(
                s.span().start,
                "keepalive_timeout must be more than 0s (an idle connection would be closed before it could be reused)".to_string(),
            );
        }
        let listen = ListenConfig {
            addr: v.socket_addr(&raw.listen.addr, DEFAULT_LISTEN_ADDR),
            header_read_timeout,
            keepalive_timeout,
            body_read_timeout: v.duration(&raw.listen.body_read_timeout, DEFAULT_BODY_READ_TIMEOUT),
            max_connections_per_ip: v.bounded_int(
                &raw.listen.max_connections_per_ip,
                0,
                0,
                1 << 24,
            ),
            max_header_bytes: v.bounded_int(
                &raw.listen.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
                8192,
                1 << 20,
            ),
            max_headers: v.bounded_int(&raw.listen.max_headers, DEFAULT_MAX_HEADERS, 1, 10_000),
            max_uri_bytes: v.bounded_int(
                &raw.listen.max_uri_bytes,
                DEFAULT_MAX_URI_BYTES,
                16,
                1 << 20,
            ),
            tunnel_idle_timeout: v
                .duration(&raw.listen.tunnel_idle_timeout, DEFAULT_TUNNEL_IDLE_TIMEOUT),
            backlog: v.bounded_int(&raw.listen.backlog, DEFAULT_BACKLOG as usize, 1, 1 << 20)
                as u32,
            max_open_connections: v.bounded_int(
                &raw.listen.max_open_connections,
                DEFAULT_MAX_OPEN_CONNECTIONS,
                1,
                1 << 24,
            ),
            proxy_protocol: raw.listen.proxy_protocol.unwrap_or(false),
            fast_path: raw.listen.fast_path.unwrap_or(true),
            trusted_proxies: v.networks(&raw.listen.trusted_proxies),
            trusted_forwarders: v.networks(&raw.listen.trusted_forwarders),
        };
        if listen.proxy_protocol && listen.trusted_proxies.is_empty() {
            v.error(0, "[listen] proxy_protocol = true needs trusted_proxies (the load balancers' networks, e.g. [\"10.0.0.0/8\"])");
        }
        let shutdown_grace = v.duration(&raw.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let workers = v.bounded_int(&raw.workers, 0, 0, MAX_WORKERS);
        let tls = raw.tls.as_ref().map(|t| {
            let require = t.require_client_cert.unwrap_or(false);
            if require && t.client_ca.is_none() {
                v.error(
                    t.cert.span().start,
                    "[tls] require_client_cert = true needs client_ca",
                );
            }
            crate::tls::TlsFiles {
                cert: base.join(t.cert.get_ref()),
                key: base.join(t.key.get_ref()),
                client_ca: t.client_ca.as_ref().map(|c| base.join(c.get_ref())),
                require_client_cert: require,
            }
        });
        let upstream = UpstreamConfig {
            addr: v.host_port(&raw.upstream.addr, DEFAULT_UPSTREAM_ADDR),
            connect_timeout: v.duration(&raw.upstream.connect_timeout, DEFAULT_CONNECT_TIMEOUT),
            response_timeout: v.duration(&raw.upstream.response_timeout, DEFAULT_RESPONSE_TIMEOUT),
            pool_idle_timeout: v
                .duration(&raw.upstream.pool_idle_timeout, DEFAULT_POOL_IDLE_TIMEOUT),
            pool_max_idle: v.bounded_int(
                &raw.upstream.pool_max_idle,
                DEFAULT_POOL_MAX_IDLE,
                0,
                1 << 20,
            ),
            max_connections: v.bounded_int(&raw.upstream.max_connections, 0, 0, 1 << 24),
            max_pending_connects: v.bounded_int(
                &raw.upstream.max_pending_connects,
                DEFAULT_MAX_PENDING_CONNECTS,
                1,
                1 << 20,
            ),
            tls: None,
        };
        let mut upstream = upstream;
        if raw.upstream.tls.unwrap_or(false) {
            match &raw.upstream.ca_file {
                None => v.error(0, "[upstream] tls = true needs ca_file (the CA bundle the backend's certificate chains to)"),
                Some(ca) => {
                    let name = raw
                        .upstream
                        .server_name
                        .as_ref()
                        .map(|n| n.get_ref().clone())
                        .unwrap_or_else(|| {
                            let host = upstream.addr.rsplit_once(':').map_or(upstream.addr.as_str(), |(h, _)| h);
                            host.trim_start_matches('[').trim_end_matches(']').to_string()
                        });
                    upstream.tls = Some((base.join(ca.get_ref()), name));
                }
            }
        } else if let Some(x) = raw
            .upstream
            .ca_file
            .as_ref()
            .or(raw.upstream.server_name.as_ref())
        {
            v.error(
                x.span().start,
                "ca_file and server_name only apply with [upstream] tls = true",
            );
        }
        let l = &raw.limits;
        let b = &l.backoff;
        let backoff_defaults = BackoffConfig::default();
        let max_keys = v.bounded_int(&l.max_keys, DEFAULT_MAX_KEYS, 1, 100_000_000);
        let backoff_key = match b.key.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("device", _)) => BackoffKey::Device,
            Some(("ip", _)) => BackoffKey::Ip,
            Some((other, span)) => {
                v.error(
                    span.start,
                    format!("[limits.backoff] key must be \"device\" (device id + client address) or \"ip\" (client address alone: every device behind one NAT shares it), not {other:?}"),
                );
                BackoffKey::Device
            }
        };
        let limits = LimitsConfig {
            max_connections: v.bounded_int(&l.max_connections, 0, 0, 1 << 24),
            handshake_rate: v.rate(&l.handshake_rate),
            per_ip_rate: v.rate(&l.per_ip_rate),
            max_keys,
            retry_after: v.duration(&l.retry_after, DEFAULT_LIMIT_RETRY_AFTER),
            jitter: v.fraction(&l.jitter, 0.5),
            backoff: BackoffConfig {
                enabled: b.enabled.unwrap_or(true),
                threshold: v.bounded_int(
                    &b.threshold,
                    backoff_defaults.threshold as usize,
                    1,
                    1_000_000,
                ) as u32,
                window: v.duration(&b.window, backoff_defaults.window),
                base: v.duration(&b.base, backoff_defaults.base),
                max: v.duration(&b.max, backoff_defaults.max),
                quiet: v.duration(&b.quiet, backoff_defaults.quiet),
                max_keys,
                key: backoff_key,
                short_tunnel: v.duration(&b.short_tunnel, backoff_defaults.short_tunnel),
            },
        };
        let admin = AdminConfig {
            addr: v.socket_addr(&raw.admin.addr, DEFAULT_ADMIN_ADDR),
            token_file: raw
                .admin
                .token_file
                .as_ref()
                .map(|p| base.join(p.get_ref())),
        };
        if let Some(a) = &raw.admin.addr {
            if admin.addr == listen.addr {
                v.error(a.span().start, "[admin] addr must differ from [listen] addr: the admin API never shares the device port");
            }
        }
        let format = match raw
            .log
            .format
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s.span()))
        {
            None | Some(("text", _)) => LogFormat::Text,
            Some(("json", _)) => LogFormat::Json,
            Some((other, span)) => {
                v.error(
                    span.start,
                    format!("[log] format must be \"text\" or \"json\", not {other:?}"),
                );
                LogFormat::Text
            }
        };
        let log = LogConfig {
            format,
            access: raw.log.access.unwrap_or(true),
            refusal_lines_per_second: v.bounded_int(
                &raw.log.refusal_lines_per_second,
                DEFAULT_REFUSAL_LOG_PER_SECOND as usize,
                0,
                1_000_000,
            ) as u32,
        };
        let rules_path = raw.rules.as_ref().map(|p| base.join(p.get_ref()));
        let state_dir = raw.state_dir.as_ref().map(|p| base.join(p.get_ref()));
        let fleet = raw.fleet.as_ref().map(|f| {
            if state_dir.is_none() {
                v.error(
                    f.etcd.span().start,
                    "[fleet] needs state_dir: each instance keeps its last-known-good copy of the fleet state there",
                );
            }
            fleet::validate(f, &base, &mut v)
        });
        if errors.is_empty() {
            Ok(Config {
                source: path.map(Path::to_path_buf),
                rules_path,
                state_dir,
                listen,
                upstream,
                admin,
                log,
                limits,
                shutdown_grace,
                workers,
                tls,
                fleet,
            })
        } else {
            Err(FileErrors(errors))
        }
    }
}

/// Collects every validation error of one file instead of stopping at the first.
struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
    errors: &'a mut Vec<FileError>,
}

impl Validator<'_> {
    fn error(&mut self, offset: usize, message: impl Into<String>) {
        self.errors
            .push(FileError::at(self.path, self.text, offset, message));
    }

    fn socket_addr(&mut self, value: &Option<Spanned<String>>, default: &str) -> SocketAddr {
        let fallback = || SocketAddr::from(([127, 0, 0, 1], 0));
        match value {
            None => default.parse().unwrap_or_else(|_| fallback()),
            Some(s) => s.get_ref().parse().unwrap_or_else(|_| {
                self.error(
                    s.span().start,
                    format!(
                        "{:?} is not an IP:port address (e.g. \"0.0.0.0:8080\" or \"[::]:8080\")",
                        s.get_ref()
                    ),
                );
                fallback()
            }),
        }
    }

    fn host_port(&mut self, value: &Option<Spanned<String>>, default: &str) -> String {
        match value {
            None => default.to_string(),
            Some(s) => {
                let text = s.get_ref();
                let ok = text
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !ok {
                    self.error(
                        s.span().start,
                        format!("{text:?} is not host:port (e.g. \"127.0.0.1:9000\" or \"backend.internal:9000\")"),
                    );
                }
                text.clone()
            }
        }
    }

    fn duration(&mut self, value: &Option<Spanned<String>>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(s) => parse_duration(s.get_ref()).unwrap_or_else(|e| {
                self.error(s.span().start, e);
                default
            }),
        }
    }

    fn networks(&mut self, value: &Option<Vec<Spanned<String>>>) -> Vec<IpNet> {
        let Some(list) = value else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in list {
            let text = item.get_ref().trim();
            // A bare address means just that host.
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => out.push(net),
                Err(_) => self.error(
                    item.span().start,
                    format!("{text:?} is not a network (e.g. \"10.0.0.0/8\", \"192.0.2.7\", \"::1/128\")"),
                ),
            }
        }
        out
    }

    fn rate(&mut self, value: &Option<Spanned<String>>) -> Option<Rate> {
        let v = value.as_ref()?;
        Rate::parse(v.get_ref())
            .map_err(|e| self.error(v.span().start, e))
            .ok()
    }

    fn fraction(&mut self, value: &Option<Spanned<f64>>, default: f64) -> f64 {
        match value {
            None => default,
            Some(s) if (0.0..=1.0).contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                self.error(
                    s.span().start,
                    format!("{} must be between 0 and 1", s.get_ref()),
                );
                default
            }
        }
    }

    fn bounded_int(
        &mut self,
        value: &Option<Spanned<i64>>,
        default: usize,
        min: usize,
        max: usize,
    ) -> usize {
        match value {
            None => default,
            Some(s) => {
                let n = *s.get_ref();
                if n < min as i64 || n > max as i64 {
                    self.error(
                        s.span().start,
                        format!("{n} is out of range: must be between {min} and {max}"),
                    );
                    default
                } else {
                    n as usize
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_admits_on_8080() {
        let c = Config::from_toml(EMBEDDED_CONFIG, None).expect("embedded config must parse");
        assert_eq!(c.listen.addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.upstream.addr, "127.0.0.1:9000");
        assert!(c.admin.addr.ip().is_loopback());
        assert!(c.rules_path.is_none());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let c = Config::from_toml(
            "rules = \"rules.toml\"\nstate_dir = \"state\"\n[admin]\ntoken_file = \"admin.token\"\n",
            Some(Path::new("/etc/fwgate/fwgate.toml")),
        )
        .unwrap();
        assert_eq!(c.rules_path.unwrap(), Path::new("/etc/fwgate/rules.toml"));
        assert_eq!(c.state_dir.unwrap(), Path::new("/etc/fwgate/state"));
        assert_eq!(
            c.admin.token_file.unwrap(),
            Path::new("/etc/fwgate/admin.token")
        );
    }

    #[test]
    fn every_error_is_reported_with_its_position() {
        let text =
            "[listen]\naddr = \"nope\"\nheader_read_timeout = \"10\"\n[upstream]\naddr = \"x\"\n";
        let errs = Config::from_toml(text, Some(Path::new("f.toml"))).unwrap_err();
        let shown = errs.to_string();
        assert_eq!(errs.0.len(), 3, "{shown}");
        assert!(shown.contains("f.toml:2:8:"), "{shown}");
        assert!(shown.contains("f.toml:3:23:"), "{shown}");
        assert!(shown.contains("f.toml:5:8:"), "{shown}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let errs = Config::from_toml(
            "[listen]\nadress = \"0.0.0.0:1\"\n",
            Some(Path::new("f.toml")),
        )
        .unwrap_err();
        let shown = errs.to_string();
        assert!(shown.starts_with("f.toml:2:1:"), "{shown}");
        assert!(shown.contains("adress"), "{shown}");
    }

    #[test]
    fn workers_come_from_the_file_then_the_environment_then_the_cpus() {
        let set = Config::from_toml("workers = 3\n", None).unwrap();
        assert_eq!(set.worker_threads(Some("7")), 3);
        let auto = Config::from_toml("workers = 0\n", None).unwrap();
        assert_eq!(auto.worker_threads(Some("7")), 7);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(auto.worker_threads(None), cpus);
        assert_eq!(auto.worker_threads(Some("lots")), cpus);
        assert_eq!(auto.worker_threads(Some("0")), cpus);
        let errs = Config::from_toml("workers = -1\n", Some(Path::new("f.toml"))).unwrap_err();
        assert!(errs.to_string().contains("f.toml:1:11:"), "{errs}");
        assert!(Config::from_toml("workers = 5000\n", None).is_err());
    }

    #[test]
    fn admin_may_not_share_the_device_port() {
        let errs = Config::from_toml(
            "[listen]\naddr = \"127.0.0.1:8080\"\n[admin]\naddr = \"127.0.0.1:8080\"\n",
            None,
        )
        .unwrap_err();
        assert!(errs.to_string().contains("must differ"));
    }
}
