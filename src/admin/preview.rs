//! What a change would do before it is made: `POST /v1/rules/preview` compiles a rules file
//! exactly as a reload would (nothing is applied, no metric series is created) and compares,
//! for every version the census knows and every open connection, today's decision with the
//! one the new rules would make. The kill-switch dry run uses the same rows.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::admin::versions::label;
use crate::gate::Gate;
use crate::limits::LimitStore;
use crate::metrics::Metrics;
use crate::rules::{file, Decider, VersionInput};

/// Largest rules file accepted for a preview (a 10,000-rule file is about 1 MB).
pub const MAX_PREVIEW_BYTES: usize = 4 * 1024 * 1024;

/// One version as the census and the registry see it now.
#[derive(Clone, Copy, Debug)]
pub struct Cohort {
    /// The version.
    pub version: VersionInput,
    /// Open tunnels and in-flight requests.
    pub active: u64,
    /// Handshakes and requests decided in the last minute.
    pub per_minute: u32,
}

/// Every version with traffic in the last hour or an open connection.
pub fn cohorts(gate: &Gate) -> Vec<Cohort> {
    let mut rows: HashMap<VersionInput, Cohort> = HashMap::new();
    for (version, figures) in gate.census.snapshot().cohorts {
        rows.insert(
            version,
            Cohort {
                version,
                active: 0,
                per_minute: figures.minute.handshakes,
            },
        );
    }
    gate.registry.for_each(|t| {
        rows.entry(t.version)
            .or_insert(Cohort {
                version: t.version,
                active: 0,
                per_minute: 0,
            })
            .active += 1;
    });
    let mut rows: Vec<Cohort> = rows.into_values().collect();
    rows.sort_by_key(|c| std::cmp::Reverse((c.active, c.per_minute)));
    rows
}

/// What a decider does, as the preview names it.
fn kind(d: &Decider) -> &'static str {
    d.action.as_str()
}

/// `POST /v1/rules/preview`: 200 with the changes, or 422 with the errors (file:line:column).
pub fn rules_preview(gate: &Gate, text: &str) -> (http::StatusCode, Value) {
    // A throwaway registry and limit store: a preview never creates a live series or bucket.
    let metrics = Metrics::new();
    let limits = LimitStore::new(1);
    let candidate = match file::compile_with_limits(
        text,
        Some(Path::new("rules.toml")),
        &metrics,
        &limits,
        0,
    ) {
        Ok(r) => r,
        Err(e) => {
            return (
                http::StatusCode::UNPROCESSABLE_ENTITY,
                json!({"valid": false, "error": e.to_string()}),
            )
        }
    };
    let snap = gate.snapshot();
    let mut changes = Vec::new();
    let mut totals: HashMap<&'static str, (u64, u64, u64)> = HashMap::new();
    for c in cohorts(gate) {
        // Kill-switch entries decide first today and would still decide first.
        if snap.kill.find(&c.version).is_some() {
            continue;
        }
        let now = snap.rules.decide(&c.version, "/");
        let then = candidate.decide(&c.version, "/");
        let (from, to) = (kind(now.decider), kind(then.decider));
        let change = match (from, to) {
            (f, "deny") if f != "deny" => "newly_refused",
            ("deny", t) if t != "deny" => "newly_admitted",
            (f, "limit") if f != "limit" => "newly_limited",
            ("limit", _) => "no_longer_limited",
            _ if now.decider.name != then.decider.name => "other_rule",
            _ => continue,
        };
        let total = totals.entry(change).or_default();
        total.0 += 1;
        total.1 += c.active;
        total.2 += u64::from(c.per_minute);
        changes.push(json!({
            "version": label(&c.version),
            "change": change,
            "from": {"decision": from, "rule": &*now.decider.name},
            "to": {"decision": to, "rule": &*then.decider.name},
            "active_connections": c.active,
            "handshakes_last_minute": c.per_minute,
        }));
    }
    let total = |name: &str| {
        let (versions, active, per_minute) = totals.get(name).copied().unwrap_or_default();
        json!({"versions": versions, "active_connections": active, "handshakes_last_minute": per_minute})
    };
    (
        http::StatusCode::OK,
        json!({
            "valid": true,
            "warnings": candidate.warnings,
            "rules": candidate.rules.len(),
            "ordering": candidate.ordering.as_str(),
            "changes": changes,
            "totals": {
                "newly_refused": total("newly_refused"),
                "newly_admitted": total("newly_admitted"),
                "newly_limited": total("newly_limited"),
                "no_longer_limited": total("no_longer_limited"),
            },
            "note": "decisions are for path \"/\", over the versions this instance has seen in the last hour and its open connections; nothing was applied",
        }),
    )
}

/// The versions a kill-switch entry would refuse, with their traffic (for a dry run).
pub fn kill_impact(gate: &Gate, entry: &crate::killswitch::Entry) -> Value {
    let mut per_minute = 0u64;
    let versions: Vec<Value> = cohorts(gate)
        .into_iter()
        .filter(|c| entry.matches(&c.version))
        .map(|c| {
            per_minute += u64::from(c.per_minute);
            json!({
                "version": label(&c.version),
                "active_connections": c.active,
                "handshakes_last_minute": c.per_minute,
            })
        })
        .collect();
    json!({"versions": versions, "handshakes_last_minute": per_minute})
}
