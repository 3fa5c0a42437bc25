//! The admin listener: health, readiness, metrics, the rules in force, reload, the fleet
//! census, and in fleet mode the fleet's state (`/v1/fleet`). It binds to loopback by default
//! and never shares the device port. Mutating endpoints need `Authorization: Bearer <token>`,
//! compared in constant time.

pub mod client;
pub mod console;
pub mod explain;
pub mod preview;
pub mod upstream;
pub mod versions;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::duration::format_duration;
use crate::gate::{Gate, KillTarget, ReloadOutcome};
use crate::killswitch;
use crate::rules::{Action, RuleSet};

/// The admin API's bearer token; never logged, never shown.
#[derive(Clone, Default)]
pub struct AdminToken(Option<Arc<str>>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "AdminToken(set)"
        } else {
            "AdminToken(unset)"
        })
    }
}

impl AdminToken {
    /// A configured token (surrounding whitespace, e.g. a trailing newline, is ignored).
    pub fn new(token: &str) -> AdminToken {
        let t = token.trim();
        AdminToken((!t.is_empty()).then(|| Arc::from(t)))
    }

    /// No token: mutating endpoints answer 403 with how to configure one.
    pub fn none() -> AdminToken {
        AdminToken(None)
    }

    /// Whether a token is configured.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn check(&self, headers: &http::HeaderMap) -> Result<(), AuthFailure> {
        let Some(expected) = &self.0 else {
            return Err(AuthFailure::NoTokenConfigured);
        };
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(AuthFailure::WrongToken)
        }
    }

    /// Checks the bearer token; on failure, the response to send (403 or 401).
    pub fn authorize(&self, headers: &http::HeaderMap) -> Option<Response<Full<Bytes>>> {
        match self.check(headers) {
            Ok(()) => None,
            Err(AuthFailure::NoTokenConfigured) => Some(json_response(
                StatusCode::FORBIDDEN,
                &json!({"error": "no admin token configured: set [admin] token_file in fwgate.toml or the FWGATE_ADMIN_TOKEN environment variable, then restart"}),
            )),
            Err(AuthFailure::WrongToken) => Some(json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "missing or wrong bearer token"}),
            )),
        }
    }
}

/// Why a mutating request was not authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthFailure {
    /// No token is configured, so nothing may mutate.
    NoTokenConfigured,
    /// The request's token is missing or wrong.
    WrongToken,
}

/// Compares without an early exit on the first differing byte (timing does not leak the token).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

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
            kill_add(gate, req).await
        }
        (&Method::DELETE, p) if p.starts_with("/v1/killswitch/") => {
            if let Some(refused) = admin.token.authorize(req.headers()) {
                return refused;
            }
            let id = &p["/v1/killswitch/".len()..];
            let actor = actor(req.headers());
            let target = kill_target(req.uri().query());
            let expect = match expect_revision(req.headers()) {
                Ok(e) => e,
                Err(r) => return *r,
            };
            match gate
                .kill_remove_from(id, actor.as_deref(), target, expect)
                .await
            {
                Ok(Some((spec, shared))) => {
                    let mut v = json!({"removed": spec});
                    if let Some(c) = shared.and_then(|s| s.convergence) {
                        v["scope"] = json!("fleet");
                        v["fleet"] = json!(c);
                    } else {
                        v["scope"] = json!("local");
                    }
                    json_response(StatusCode::OK, &v)
                }
                Ok(None) => {
                    let local_only = target == KillTarget::Default
                        && gate.shared_store().is_some()
                        && gate
                            .local_kill_set()
                            .entries
                            .iter()
                            .any(|e| e.spec.id == id);
                    let hint = if local_only {
                        format!(" in the fleet store; {id:?} is a local entry of this instance: remove it with --local (?scope=local)")
                    } else {
                        String::new()
                    };
                    json_response(
                        StatusCode::NOT_FOUND,
                        &json!({"error": format!("no kill-switch entry {id:?}{hint}")}),
                    )
                }
                Err(e) => kill_error(e),
            }
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

/// Largest JSON body accepted on the admin API.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Who made a change, as the CLI says (`X-Fwgate-Actor`), sanitised and bounded for the audit log.
fn actor(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get("x-fwgate-actor")?.to_str().ok()?;
    let clean: String = v
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect();
    (!clean.is_empty()).then_some(clean)
}

/// `?scope=local`: this instance only, even in fleet mode.
fn kill_target(query: Option<&str>) -> KillTarget {
    if query.is_some_and(|q| q.split('&').any(|p| p == "scope=local")) {
        KillTarget::Local
    } else {
        KillTarget::Default
    }
}

/// `X-Fwgate-Expect-Revision: N`: compare-and-set against the store revision the client saw
/// (0: the entry must not exist yet). Fleet mode only; ignored otherwise.
fn expect_revision(headers: &http::HeaderMap) -> Result<Option<i64>, Box<Response<Full<Bytes>>>> {
    let Some(v) = headers.get("x-fwgate-expect-revision") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .map(Some)
        .ok_or_else(|| {
            Box::new(json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "X-Fwgate-Expect-Revision must be a store revision (0: the entry must not exist yet)"}),
            ))
        })
}

async fn kill_add(gate: &Gate, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let dry_run = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "dry_run=true" || p == "dry_run=1")
    });
    let target = kill_target(req.uri().query());
    let expect = match expect_revision(req.headers()) {
        Ok(e) => e,
        Err(r) => return *r,
    };
    let actor = actor(req.headers());
    let read = http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY).collect();
    // The whole (small) body within `[listen] body_read_timeout`, as device bodies between reads.
    let timeout = gate.config.listen.body_read_timeout;
    let read = async {
        if timeout.is_zero() {
            Ok(read.await)
        } else {
            tokio::time::timeout(timeout, read).await
        }
    };
    let body = match read.await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("cannot read body (at most {MAX_ADMIN_BODY} bytes): {e}")}),
            )
        }
        Err(_) => {
            return json_response(
                StatusCode::REQUEST_TIMEOUT,
                &json!({"error": format!("request body not received within {timeout:?} ([listen] body_read_timeout)")}),
            )
        }
    };
    let new: killswitch::NewEntry = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("invalid JSON: {e}"), "example": {"versions": ">=3.8.0-b3", "reason": "incident 123", "ttl": "2h"}}),
            )
        }
    };
    let spec = match killswitch::spec_from_request(new, gate.rules().ordering, actor) {
        Ok(s) => s,
        Err(e) => return kill_error(e),
    };
    match gate
        .kill_add_to(spec.clone(), dry_run, target, expect)
        .await
    {
        Ok(outcome) => {
            let impact = outcome.impact;
            let fleet = outcome.shared.is_some();
            let mut v = json!({
                "dry_run": dry_run,
                "entry": spec,
                "scope": if fleet { "fleet" } else { "local" },
                "impact": {"matching_connections": impact.matching, "closing": impact.closing},
                "undo": format!("fwgate kill rm {}{}", spec.id, if fleet || gate.shared_store().is_none() { "" } else { " --local" }),
            });
            if let Some(c) = outcome.shared.and_then(|s| s.convergence) {
                v["fleet"] = json!(c);
            }
            // What the census says the entry refuses: its versions and their traffic.
            if let Ok(entry) = killswitch::compile_entry(
                spec.clone(),
                gate.rules().ordering,
                &crate::metrics::Metrics::new(),
            ) {
                v["census"] = preview::kill_impact(gate, &entry);
            }
            json_response(
                if dry_run {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                },
                &v,
            )
        }
        Err(e) => kill_error(e),
    }
}

fn kill_error(e: killswitch::KillSwitchError) -> Response<Full<Bytes>> {
    match e {
        killswitch::KillSwitchError::Invalid(m) => {
            json_response(StatusCode::BAD_REQUEST, &json!({"error": m}))
        }
        killswitch::KillSwitchError::State { .. } => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": e.to_string(), "note": "nothing was changed"}),
        ),
        killswitch::KillSwitchError::Unavailable(m) => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": m}))
        }
        killswitch::KillSwitchError::Conflict(m) => json_response(
            StatusCode::CONFLICT,
            &json!({"error": m, "note": "nothing was changed"}),
        ),
    }
}

/// The kill-switch entries as JSON (for `GET /v1/killswitch`).
pub fn killswitch_json(gate: &Gate) -> Value {
    let set = gate.kill_set();
    let now = killswitch::unix_now();
    let mut active: HashMap<&str, usize> = HashMap::new();
    gate.registry.for_each(|t| {
        for e in set.entries.iter().filter(|e| e.matches(&t.version)) {
            *active.entry(e.spec.id.as_str()).or_default() += 1;
        }
    });
    let entries: Vec<Value> = set
        .entries
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(&e.spec).unwrap_or(Value::Null);
            v["scope"] = json!(e.scope.as_str());
            if let killswitch::Scope::Fleet { revision } = e.scope {
                v["revision"] = json!(revision);
            }
            v["active"] = json!(e.active_at(now));
            v["expires_in_s"] = json!(e.spec.expires_at.map(|x| x.saturating_sub(now)));
            v["matching_connections"] = json!(active.get(e.spec.id.as_str()).copied().unwrap_or(0));
            v
        })
        .collect();
    let mut v = json!({"entries": entries, "persisted_in": gate.kill_state_file().map(|p| p.display().to_string())});
    if let Some(store) = gate.shared_store() {
        v["fleet_store"] = json!(store.describe());
        v["synced"] = json!(!gate.fleet_unsynced());
    }
    v
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

/// The rules in force as JSON (for `/v1/rules`).
pub fn rules_json(gate: &Gate) -> Value {
    let rules = gate.rules();
    let status = gate.reload_status();
    let mut v = rule_set_json(&rules);
    v["diff_from_previous"] = match gate.previous_rules() {
        Some((generation, text)) => json!({
            "from_generation": generation,
            "lines": diff_lines(&text, &rules.source.text),
        }),
        None => Value::Null,
    };
    v["last_error"] = status.last_error.map(Value::from).unwrap_or(Value::Null);
    v["last_reload_attempt_unix"] = status
        .last_attempt_unix
        .map(Value::from)
        .unwrap_or(Value::Null);
    v
}

/// A line diff of two rules files with 3 lines of context, as `{"op": "+"|"-"|" ", "text"}`
/// (hunks separated by `{"op": "@", "text": "..."}`).
fn diff_lines(old: &str, new: &str) -> Vec<Value> {
    let diff = similar::TextDiff::from_lines(old, new);
    let mut lines = Vec::new();
    for (i, group) in diff.grouped_ops(3).iter().enumerate() {
        if i > 0 {
            lines.push(json!({"op": "@", "text": "..."}));
        }
        for op in group {
            for change in diff.iter_changes(op) {
                let sign = match change.tag() {
                    similar::ChangeTag::Delete => "-",
                    similar::ChangeTag::Insert => "+",
                    similar::ChangeTag::Equal => " ",
                };
                lines.push(json!({"op": sign, "text": change.value().trim_end_matches('\n')}));
            }
        }
    }
    lines
}

/// A rule set as JSON.
pub fn rule_set_json(rules: &RuleSet) -> Value {
    let action = |a: &Action| match a {
        Action::Allow => json!({"action": "allow"}),
        Action::Deny(r) => json!({
            "action": "deny",
            "status": r.status.as_u16(),
            "retry_after": r.retry_after.map(format_duration),
            "jitter": r.jitter,
        }),
        Action::Limit(l) => {
            let spec = l.state.spec();
            json!({
                "action": "limit",
                "rate": spec.rate.map(|(r, _)| format!("{}/{}", r.count, match r.per.as_secs() { 1 => "s", 60 => "m", _ => "h" })),
                "burst": spec.rate.map(|(r, b)| b.map_or(r.count.get(), |b| b.get())),
                "key": spec.key.as_str(),
                "max_connections": spec.max_connections,
                "open_connections": l.state.open_connections(),
                "keys": l.state.keys(),
                "status": l.refusal.status.as_u16(),
            })
        }
    };
    let list: Vec<Value> = rules
        .rules
        .iter()
        .map(|r| {
            let mut v = action(&r.decider.action);
            v["name"] = json!(&*r.decider.name);
            v["versions"] = json!(r.range.as_str());
            v["mode"] = json!(r.mode.as_str());
            v["path_prefix"] = json!(r.path_prefix.as_deref());
            v["close_existing"] = json!(r.decider.close_existing);
            v["drain"] = json!(format_duration(r.decider.drain));
            v["line"] = json!(r.line);
            v
        })
        .collect();
    json!({
        "generation": rules.source.generation,
        "source": rules.source.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<embedded>".into()),
        "content_hash": rules.source.content_hash,
        "loaded_at_unix": rules.source.loaded_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "ordering": rules.ordering.as_str(),
        "version_sources": rules.version_sources.sources().iter().map(|s| s.describe()).collect::<Vec<_>>(),
        "device_id_sources": rules.device_sources.sources().iter().map(|s| s.describe()).collect::<Vec<_>>(),
        "defaults": {
            "action": action(&rules.defaults.no_match.action),
            "missing": action(&rules.defaults.missing.action),
            "unparseable": action(&rules.defaults.unparseable.action),
        },
        "rules": list,
        "warnings": rules.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_is_trimmed_and_never_debug_printed() {
        let t = AdminToken::new("s3cret\n");
        assert!(t.is_set());
        assert!(!format!("{t:?}").contains("s3cret"));
        let mut h = http::HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(t.authorize(&h).is_none());
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer nope"));
        assert_eq!(t.authorize(&h).unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            AdminToken::none().authorize(&h).unwrap().status(),
            StatusCode::FORBIDDEN
        );
    }
}
