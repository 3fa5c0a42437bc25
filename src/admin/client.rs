//! A minimal client for the admin API, used by `fwgate kill` to act on one instance or a whole
//! fleet at once. Plain HTTP/1.1 over TCP with a deadline; nothing is retried silently.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one admin call may take before the instance is reported as failed. In fleet mode
/// a change is answered only once the store took it (its request timeout, 5 s by default) and
/// the fleet applied it (at most 5 s), so this covers both with a margin.
pub const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(12);

/// One admin API call: `base` is `http://host:port`. Returns (status, body).
pub async fn call(
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    actor: Option<&str>,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base}: admin URL must start with http://"))?
        .trim_end_matches('/');
    let fut = async {
        let stream = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(a) = actor {
            req = req.header("x-fwgate-actor", a);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading answer: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(ADMIN_CALL_TIMEOUT, fut)
        .await
        .map_err(|_| format!("no answer within {ADMIN_CALL_TIMEOUT:?}"))?
}
