//! The admin listener: health, readiness, metrics, the rules in force, reload, the fleet
//! census, and in fleet mode the fleet's state (`/v1/fleet`). It binds to loopback by default
//! and never shares the device port. Mutating endpoints need `Authorization: Bearer <token>`,
//! compared in constant time.

pub mod client;
pub mod console;
pub mod explain;
mod kill;
pub mod preview;
mod rules;
mod token;
pub mod upstream;
pub mod versions;

pub use kill::killswitch_json;
pub use rules::{rule_set_json, rules_json};
pub use token::AdminToken;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::gate::{Gate, ReloadOutcome};

/// Everything the admin endpoints need.
pub struct Admin {
    /// The admission state.
    pub gate: Arc<Gate>,
    /// Bearer token for mutating endpoints.
    pub token: AdminToken,
}

/// Serves the admin API until `shutdown` resolves.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn route(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(page) = console::serve(req.method(), req.uri().path(), req.headers()) {
        return page;
    }
    let gate = &admin.gate;
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match gate.not_ready_reason() {
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
            None => text(StatusCode::OK, "ready\n"),
        },
        (&Method::GET, "/v1/fleet") => match gate.shared_store() {
            Some(store) => json_response(StatusCode::OK, &store.status().await),
            None => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "fleet mode is off: add [fleet] etcd = [\"http://host:2379\"] to fwgate.toml"}),
            ),
        },
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(gate.metrics.encode())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/v1/rules") => json_response(StatusCode::OK, &rules_json(gate)),
        (&Method::POST, "/v1/reload") => {
            if let Some(refused) = admin.token.authorize(req.headers()) {
                return refused;
            }
            match gate.reload(false).await {
                Ok(ReloadOutcome::Applied {
                    generation,
                    closing,
                }) => json_response(
                    StatusCode::OK,
                    &json!({"result": "applied", "generation": generation, "closing_connections": closing}),
                ),
                Ok(ReloadOutcome::Unchanged { generation }) => json_response(
                    StatusCode::OK,
                    &json!({"result": "unchanged", "generation": generation}),
                ),
                Err(errors) => json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"result": "error", "generation": gate.rules().source.generation,
                            "error": errors.to_string(),
                            "note": "the previous rules stay in force"}),
                ),
            }
        }
        (&Method::GET, "/v1/versions") => json_response(StatusCode::OK, &versions::report(gate)),
        (&Method::GET, "/v1/timeline") => json_response(StatusCode::OK, &versions::timeline(gate)),
        (&Method::GET, "/v1/upstream") => json_response(StatusCode::OK, &upstream::upstream(gate)),
        (&Method::GET, "/v1/audit") => {
            json_response(StatusCode::OK, &json!({"events": gate.audit.recent()}))
        }
        (&Method::GET, "/v1/explain") => {
            let (status, body) = explain::explain(gate, req.uri().query());
            json_response(status, &body)
        }
        (&Method::POST, "/v1/rules/preview") => {
            use http_body_util::BodyExt as _;
            let limited = http_body_util::Limited::new(req.into_body(), preview::MAX_PREVIEW_BYTES);
            match limited.collect().await.map(|b| b.to_bytes()) {
                Ok(body) => match std::str::from_utf8(&body) {
                    Ok(text) => {
                        let (status, body) = preview::rules_preview(gate, text);
                        json_response(status, &body)
                    }
                    Err(_) => json_response(
                        StatusCode::BAD_REQUEST,
                        &json!({"valid": false, "error": "the rules file is not valid UTF-8"}),
                    ),
                },
                Err(e) => json_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &json!({"valid": false, "error": format!("cannot read the rules file (at most {} bytes): {e}", preview::MAX_PREVIEW_BYTES)}),
                ),
            }
        }
        (&Method::GET, "/v1/killswitch") => json_response(StatusCode::OK, &killswitch_json(gate)),
        (&Method::POST, "/v1/killswitch") => {
            if let Some(refused) = admin.token.authorize(req.headers()) {
                return refused;
            }
            kill::kill_add(gate, req).await
        }
        (&Method::DELETE, p) if p.starts_with("/v1/killswitch/") => {
            if let Some(refused) = admin.token.authorize(req.headers()) {
                return refused;
            }
            kill::kill_remove(gate, req).await
        }
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/v1/rules" | "/v1/reload" | "/v1/versions"
            | "/v1/timeline" | "/v1/upstream" | "/v1/audit" | "/v1/explain" | "/v1/rules/preview"
            | "/v1/killswitch" | "/v1/fleet",
        ) => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": format!("{} is not allowed on {path}", req.method())}),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not found", "endpoints": ["GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/rules", "POST /v1/reload", "POST /v1/rules/preview", "GET /v1/versions", "GET /v1/timeline", "GET /v1/upstream", "GET /v1/audit", "GET /v1/explain?version=V", "GET /v1/killswitch", "POST /v1/killswitch", "DELETE /v1/killswitch/{id}", "GET /v1/fleet"]}),
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON response (pretty-printed: operators read these with curl).
pub fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
