//! A small typed client for etcd's v3 API over its JSON gateway (`POST /v3/...`), on the hyper
//! client already in the tree: no code generation, no `protoc`, no tonic.
//!
//! What it guarantees:
//! - every request has a deadline (`request_timeout`, failover included) and every answer a
//!   size cap ([`MAX_RESPONSE_BYTES`]);
//! - endpoints are tried in order starting from the last one that answered; a request moves on
//!   to the next endpoint only when it provably was not sent (connect failure, a pooled
//!   connection found closed) or when it is a read, so a write is never applied twice behind
//!   the caller's back and an unknown outcome is reported as such;
//! - with `username`/`password_file`, a token is fetched on first use and fetched again once
//!   when etcd says it is invalid or expired; the token and the password are never logged;
//! - etcd's messages are escaped before they reach a log line or an error.

pub mod transport;
pub mod types;
pub mod watch;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::FleetConfig;
use transport::{Connection, Transport};
use types::*;

/// Largest answer accepted from etcd (a full state range with rules is far below).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Idle connections kept per client for reuse.
const MAX_IDLE: usize = 4;

/// What went wrong talking to etcd. Messages name the store or the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint could be reached.
    #[error("{store} unreachable: {detail}")]
    Unreachable {
        /// The endpoints.
        store: String,
        /// The last endpoint's failure.
        detail: String,
    },
    /// The request was sent but no complete answer came back: for a write, the outcome is unknown.
    #[error("{endpoint} did not answer: {detail}")]
    NoAnswer {
        /// The endpoint.
        endpoint: String,
        /// What happened.
        detail: String,
    },
    /// etcd refused the request.
    #[error("{endpoint} refused the request: {message} (gRPC code {code})")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// gRPC status code.
        code: i32,
        /// etcd's message (escaped).
        message: String,
    },
    /// The answer was not what the API promises (malformed, too large).
    #[error("{endpoint}: {detail}")]
    Protocol {
        /// The endpoint.
        endpoint: String,
        /// What was wrong.
        detail: String,
    },
    /// Local setup: TLS files, the password file.
    #[error("{0}")]
    Config(String),
}

impl EtcdError {
    /// etcd says the token is missing, invalid or expired.
    pub fn is_auth(&self) -> bool {
        match self {
            EtcdError::Refused { code, message, .. } => {
                *code == 16
                    || message.contains("invalid auth token")
                    || message.contains("user name is empty")
            }
            _ => false,
        }
    }

    /// etcd does not know the lease (it expired or was revoked).
    pub fn is_lease_not_found(&self) -> bool {
        matches!(self, EtcdError::Refused { message, .. } if message.contains("lease not found"))
    }

    /// The request may have been applied even though it failed (a write must not be retried
    /// blindly, and the operator must be told).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, EtcdError::NoAnswer { .. })
    }
}

/// Makes wire text safe for one log line: control characters escaped, length bounded.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(300));
    for c in text.chars() {
        if out.len() >= 300 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// User and password for etcd's auth (never printed).
struct Credentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, password redacted)", self.user)
    }
}

/// A pooled idle connection.
struct Idle {
    endpoint: usize,
    conn: Connection<Full<Bytes>>,
}

/// Whether a request may be sent again after it may have reached etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// A read: any endpoint, any failure.
    Always,
    /// A write: only when it provably was not sent.
    IfNotSent,
}

/// The etcd client (cheap to clone).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    request_timeout: Duration,
    preferred: AtomicUsize,
    idle: Mutex<Vec<Idle>>,
    credentials: Option<Credentials>,
    token: tokio::sync::Mutex<Option<Arc<str>>>,
    store: String,
}

impl Client {
    /// A client for the configured endpoints; reads the TLS files and the password file now, so
    /// a missing file is reported at start-up.
    pub fn new(config: &FleetConfig) -> Result<Client, EtcdError> {
        let transport = Transport::new(config).map_err(EtcdError::Config)?;
        let credentials = match &config.auth {
            None => None,
            Some((user, file)) => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    EtcdError::Config(format!(
                        "{}: cannot read the etcd password ([fleet] password_file): {e}",
                        file.display()
                    ))
                })?;
                Some(Credentials {
                    user: user.clone(),
                    password: text.trim_end().to_string(),
                })
            }
        };
        Ok(Client {
            inner: Arc::new(Inner {
                transport,
                request_timeout: config.request_timeout,
                preferred: AtomicUsize::new(0),
                idle: Mutex::new(Vec::new()),
                credentials,
                token: tokio::sync::Mutex::new(None),
                store: config.describe(),
            }),
        })
    }

    /// `etcd <endpoints>`, for messages.
    pub fn describe(&self) -> &str {
        &self.inner.store
    }

    /// The per-request deadline.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// Reads keys.
    pub async fn range(&self, req: &RangeRequest) -> Result<RangeResponse, EtcdError> {
        self.call("/v3/kv/range", req, Retry::Always).await
    }

    /// Writes one key.
    pub async fn put(&self, req: &PutRequest) -> Result<PutResponse, EtcdError> {
        self.call("/v3/kv/put", req, Retry::IfNotSent).await
    }

    /// Deletes keys.
    pub async fn delete_range(
        &self,
        req: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, EtcdError> {
        self.call("/v3/kv/deleterange", req, Retry::IfNotSent).await
    }

    /// Runs a transaction (compare-and-set).
    pub async fn txn(&self, req: &TxnRequest) -> Result<TxnResponse, EtcdError> {
        self.call("/v3/kv/txn", req, Retry::IfNotSent).await
    }

    /// Grants a lease of `ttl` seconds.
    pub async fn lease_grant(&self, ttl: i64) -> Result<LeaseResponse, EtcdError> {
        self.call(
            "/v3/lease/grant",
            &LeaseGrantRequest { ttl },
            Retry::IfNotSent,
        )
        .await
    }

    /// Renews a lease; a `ttl` of 0 in the answer means it no longer exists.
    pub async fn lease_keepalive(&self, id: i64) -> Result<LeaseResponse, EtcdError> {
        let r: Streamed<LeaseResponse> = self
            .call("/v3/lease/keepalive", &LeaseIdRequest { id }, Retry::Always)
            .await?;
        match (r.result, r.error) {
            (Some(l), _) => Ok(l),
            (None, Some(e)) => Err(self.refused(
                "keep-alive",
                e.code,
                if e.message.is_empty() {
                    &e.error
                } else {
                    &e.message
                },
            )),
            (None, None) => Ok(LeaseResponse::default()),
        }
    }

    /// Revokes a lease (its keys disappear at once).
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        let _: serde_json::Value = self
            .call("/v3/lease/revoke", &LeaseIdRequest { id }, Retry::Always)
            .await?;
        Ok(())
    }

    /// Forgets the auth token, so that the next request authenticates again.
    pub async fn invalidate_token(&self) {
        *self.inner.token.lock().await = None;
    }

    fn refused(&self, endpoint: &str, code: i32, message: &str) -> EtcdError {
        EtcdError::Refused {
            endpoint: endpoint.to_string(),
            code,
            message: escape(message),
        }
    }

    /// The auth token to send (authenticating first when needed); `None` without auth.
    async fn token(&self) -> Result<Option<Arc<str>>, EtcdError> {
        let Some(creds) = &self.inner.credentials else {
            return Ok(None);
        };
        let mut slot = self.inner.token.lock().await;
        if let Some(t) = slot.as_ref() {
            return Ok(Some(t.clone()));
        }
        let body = serde_json::to_vec(&AuthenticateRequest {
            name: &creds.user,
            password: &creds.password,
        })
        .map_err(|e| EtcdError::Config(format!("cannot encode the authentication: {e}")))?;
        let answer: AuthenticateResponse = self
            .exchange(
                "/v3/auth/authenticate",
                Bytes::from(body),
                None,
                Retry::Always,
            )
            .await?;
        if answer.token.is_empty() {
            return Err(EtcdError::Protocol {
                endpoint: self.inner.store.clone(),
                detail: "authentication answered without a token".into(),
            });
        }
        let token: Arc<str> = Arc::from(answer.token);
        *slot = Some(token.clone());
        tracing::info!(store = %self.inner.store, user = %escape(&creds.user), "authenticated to etcd");
        Ok(Some(token))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &'static str,
        req: &Req,
        retry: Retry,
    ) -> Result<Resp, EtcdError> {
        let body =
            Bytes::from(serde_json::to_vec(req).map_err(|e| {
                EtcdError::Config(format!("cannot encode the request to {path}: {e}"))
            })?);
        let token = self.token().await?;
        match self
            .exchange(path, body.clone(), token.clone(), retry)
            .await
        {
            Err(e) if e.is_auth() && self.inner.credentials.is_some() => {
                // Expired or revoked token: authenticate again, once. A request refused for
                // its token was not applied, so sending it again is safe.
                let mut slot = self.inner.token.lock().await;
                if slot.as_ref().map(|t| t.as_ref()) == token.as_deref() {
                    *slot = None;
                }
                drop(slot);
                let token = self.token().await?;
                self.exchange(path, body, token, retry).await
            }
            other => other,
        }
    }

    /// One request with failover; the whole thing bounded by the request timeout.
    async fn exchange<Resp: DeserializeOwned>(
        &self,
        path: &'static str,
        body: Bytes,
        token: Option<Arc<str>>,
        retry: Retry,
    ) -> Result<Resp, EtcdError> {
        let timeout = self.inner.request_timeout;
        let n = self.inner.transport.endpoints.len().max(1);
        let start = self.inner.preferred.load(Ordering::Relaxed) % n;
        let attempt = async {
            let mut last = String::from("no endpoint configured");
            for i in 0..n {
                let index = (start + i) % n;
                let endpoint = self.endpoint_url(index);
                match self
                    .exchange_one(index, path, &body, token.as_deref())
                    .await
                {
                    Ok((status, bytes)) => {
                        self.inner.preferred.store(index, Ordering::Relaxed);
                        return self.decode(&endpoint, status, &bytes);
                    }
                    Err(Failure::NotSent(e)) => last = format!("{endpoint}: {e}"),
                    Err(Failure::Sent(e)) if retry == Retry::Always => {
                        last = format!("{endpoint}: {e}")
                    }
                    Err(Failure::Sent(e)) => {
                        return Err(EtcdError::NoAnswer {
                            endpoint,
                            detail: format!("{e}; the outcome of this write is unknown"),
                        })
                    }
                }
            }
            Err(EtcdError::Unreachable {
                store: self.inner.store.clone(),
                detail: last,
            })
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(match retry {
                Retry::Always => EtcdError::Unreachable {
                    store: self.inner.store.clone(),
                    detail: format!("no answer within {timeout:?}"),
                },
                Retry::IfNotSent => EtcdError::NoAnswer {
                    endpoint: self.inner.store.clone(),
                    detail: format!(
                        "no answer within {timeout:?}; the outcome of this write is unknown"
                    ),
                },
            }),
        }
    }

    fn endpoint_url(&self, index: usize) -> String {
        self.inner
            .transport
            .endpoints
            .get(index)
            .map(|e| e.url.clone())
            .unwrap_or_default()
    }

    fn decode<Resp: DeserializeOwned>(
        &self,
        endpoint: &str,
        status: StatusCode,
        bytes: &[u8],
    ) -> Result<Resp, EtcdError> {
        if status != StatusCode::OK {
            return Err(match serde_json::from_slice::<GatewayError>(bytes) {
                Ok(e) => self.refused(
                    endpoint,
                    e.code,
                    if e.message.is_empty() {
                        &e.error
                    } else {
                        &e.message
                    },
                ),
                Err(_) => EtcdError::Protocol {
                    endpoint: endpoint.to_string(),
                    detail: format!(
                        "HTTP {status}: {}",
                        escape(&String::from_utf8_lossy(&bytes[..bytes.len().min(200)]))
                    ),
                },
            });
        }
        serde_json::from_slice(bytes).map_err(|e| EtcdError::Protocol {
            endpoint: endpoint.to_string(),
            detail: format!("unexpected answer: {e}"),
        })
    }

    /// One request on one endpoint: on a pooled connection when one is idle, and on a fresh one
    /// when there is none or the pooled one turns out closed before the request left.
    async fn exchange_one(
        &self,
        index: usize,
        path: &str,
        body: &Bytes,
        token: Option<&str>,
    ) -> Result<(StatusCode, Bytes), Failure> {
        if let Some(conn) = self.take_idle(index) {
            match self.send_on(conn, index, path, body, token).await {
                Err(Failure::NotSent(_)) => {}
                other => return other,
            }
        }
        let conn = self
            .inner
            .transport
            .connect(index)
            .await
            .map_err(Failure::NotSent)?;
        self.send_on(conn, index, path, body, token).await
    }

    /// A JSON POST to endpoint `index`, with the auth token when there is one.
    fn post(&self, index: usize, path: &str, token: Option<&str>) -> http::request::Builder {
        let authority = self
            .inner
            .transport
            .endpoints
            .get(index)
            .map(|e| e.authority())
            .unwrap_or_default();
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        match token {
            Some(t) => req.header(http::header::AUTHORIZATION, t),
            None => req,
        }
    }

    async fn send_on(
        &self,
        mut conn: Connection<Full<Bytes>>,
        index: usize,
        path: &str,
        body: &Bytes,
        token: Option<&str>,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let req = self
            .post(index, path, token)
            .body(Full::new(body.clone()))
            .map_err(|e| Failure::NotSent(format!("request: {e}")))?;
        conn.sender
            .ready()
            .await
            .map_err(|e| Failure::NotSent(format!("connection not usable: {e}")))?;
        let resp = match conn.sender.try_send_request(req).await {
            Ok(r) => r,
            Err(e) if e.message().is_some() => {
                return Err(Failure::NotSent(format!(
                    "connection closed: {}",
                    e.error()
                )))
            }
            Err(e) => return Err(Failure::Sent(format!("request failed: {}", e.error()))),
        };
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                Failure::Sent(format!(
                    "reading the answer (at most {MAX_RESPONSE_BYTES} bytes): {e}"
                ))
            })?
            .to_bytes();
        self.put_idle(index, conn);
        Ok((status, bytes))
    }

    fn take_idle(&self, index: usize) -> Option<Connection<Full<Bytes>>> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(pos) = idle.iter().position(|i| i.endpoint == index) {
            let i = idle.swap_remove(pos);
            if !i.conn.sender.is_closed() {
                return Some(i.conn);
            }
        }
        None
    }

    fn put_idle(&self, index: usize, conn: Connection<Full<Bytes>>) {
        if conn.sender.is_closed() {
            return;
        }
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                endpoint: index,
                conn,
            });
        }
    }
}

/// How one attempt failed.
enum Failure {
    /// Before the request left: another endpoint may be tried.
    NotSent(String),
    /// After: etcd may have applied it.
    Sent(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_bounds_and_neutralises_wire_text() {
        assert_eq!(escape("a\nb\x1b[31m"), "a\\nb\\u{1b}[31m");
        assert!(escape(&"x".repeat(1000)).chars().count() <= 301);
    }

    #[test]
    fn auth_errors_are_recognised() {
        let e = EtcdError::Refused {
            endpoint: "e".into(),
            code: 16,
            message: "etcdserver: invalid auth token".into(),
        };
        assert!(e.is_auth());
        let e = EtcdError::Refused {
            endpoint: "e".into(),
            code: 3,
            message: "etcdserver: user name is empty".into(),
        };
        assert!(e.is_auth());
        let e = EtcdError::Refused {
            endpoint: "e".into(),
            code: 5,
            message: "etcdserver: requested lease not found".into(),
        };
        assert!(!e.is_auth() && e.is_lease_not_found());
    }

    #[tokio::test]
    async fn an_unreachable_store_is_named_and_bounded() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = crate::config::Config::from_toml(
            &format!("state_dir = \"s\"\n[fleet]\netcd = [\"http://{dead}\"]\nrequest_timeout = \"1s\"\n"),
            None,
        )
        .unwrap();
        let client = Client::new(config.fleet.as_ref().unwrap()).unwrap();
        let started = std::time::Instant::now();
        let e = client
            .range(&RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(
            e.to_string().contains(&format!("etcd http://{dead}")),
            "{e}"
        );
        assert!(matches!(e, EtcdError::Unreachable { .. }), "{e}");
    }
}
