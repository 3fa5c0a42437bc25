//! The rules in force as JSON (`GET /v1/rules`): generation, source, rules, defaults,
//! warnings, the last reload error and the diff against the previous generation. Fleet
//! publications use the same shape.

use std::time::UNIX_EPOCH;

use serde_json::{json, Value};

use crate::duration::format_duration;
use crate::gate::Gate;
use crate::rules::{Action, RuleSet};

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
