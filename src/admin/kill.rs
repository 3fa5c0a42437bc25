//! The kill-switch endpoints: `GET|POST /v1/killswitch`, `DELETE /v1/killswitch/{id}` (with
//! `?dry_run=true`, `?scope=local` and, in fleet mode, `X-Fwgate-Expect-Revision` for
//! compare-and-set), and who made a change for the audit trail.

use std::collections::HashMap;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::{json_response, preview};
use crate::gate::{Gate, KillTarget};
use crate::killswitch;

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

pub(super) async fn kill_add(gate: &Gate, req: Request<Incoming>) -> Response<Full<Bytes>> {
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

/// `DELETE /v1/killswitch/{id}` (authorised by the caller).
pub(super) async fn kill_remove(gate: &Gate, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let id = &path["/v1/killswitch/".len()..];
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
