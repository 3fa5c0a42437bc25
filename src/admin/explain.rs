//! `GET /v1/explain?version=V[&path=P]`: what `fwgate explain` says, against the rules and
//! kill-switch entries this instance has in force, as JSON (the console's "explain this
//! version" box).

use serde_json::{json, Value};

use crate::admin::versions::label;
use crate::cli::{self, ExplainInput};
use crate::extract::percent_decode;
use crate::gate::Gate;
use crate::rules::{Action, DecidedBy, VersionInput};

/// The decision for `version` on `path`, and the explanation `fwgate explain` prints.
pub fn explain(gate: &Gate, query: Option<&str>) -> (http::StatusCode, Value) {
    let param = |name: &str| {
        query?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
    };
    let Some(input) = param("version") else {
        return (
            http::StatusCode::BAD_REQUEST,
            json!({"error": "give the version to explain: /v1/explain?version=3.8.0-b3[&path=/ws]"}),
        );
    };
    let path = param("path").unwrap_or_else(|| "/".into());
    let snap = gate.snapshot();
    let version = VersionInput::from_text(&input, snap.rules.ordering);
    let text = cli::explain(
        &snap.rules,
        &snap.kill,
        &ExplainInput {
            version: Some(input.clone()),
            headers: Vec::new(),
            query: None,
            path: path.clone(),
        },
    )
    .unwrap_or_else(|e| e);
    let normal = crate::path::normalize(&path);
    let d = gate.decide(&snap, &version, &normal);
    let (decision, status) = match &d.decider.action {
        Action::Allow => ("allow", None),
        Action::Deny(r) => ("deny", Some(r.status.as_u16())),
        Action::Limit(l) => ("limit", Some(l.refusal.status.as_u16())),
    };
    let by = match d.by {
        DecidedBy::KillSwitch => "kill switch".to_string(),
        DecidedBy::Rule(_) => snap
            .rules
            .rule(d.by)
            .map_or_else(|| "rule".into(), |r| format!("rule (line {})", r.line)),
        DecidedBy::Default => "[defaults] action".into(),
        DecidedBy::Missing => "[defaults] missing".into(),
        DecidedBy::Unparseable => "[defaults] unparseable".into(),
    };
    (
        http::StatusCode::OK,
        json!({
            "input": input,
            "path": &*normal,
            "version": match version {
                VersionInput::Parsed(_) => Value::from(label(&version)),
                _ => Value::Null,
            },
            "decision": decision,
            "status": status,
            "rule": &*d.decider.name,
            "by": by,
            "shadow": d.shadow.map(|s| &*s.name),
            "text": text,
        }),
    )
}
