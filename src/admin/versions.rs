//! `GET /v1/versions`: the census as JSON, with today's decision for every version listed.
//! The census only counts; this joins its figures with the open connections (registry) and
//! the rules and kill switch in force.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::census::{CohortFigures, CohortTally, REFUSAL_REASONS};
use crate::gate::Gate;
use crate::rules::VersionInput;

/// Versions listed in a report; the rest are summed into `other`.
pub const REPORTED_VERSIONS: usize = 100;

/// The census report: top versions by activity (open connections, then the last hour's
/// handshakes), each with what was admitted and refused (by reason) and today's decision.
pub fn report(gate: &Gate) -> Value {
    let snapshot = gate.census.snapshot();
    let mut rows: HashMap<VersionInput, (u64, Option<CohortFigures>)> = snapshot
        .cohorts
        .into_iter()
        .map(|(version, figures)| (version, (0, Some(figures))))
        .collect();
    gate.registry.for_each(|t| {
        rows.entry(t.version).or_default().0 += 1;
    });
    let mut rows: Vec<_> = rows.into_iter().collect();
    rows.sort_by_key(|(_, (active, figures))| {
        let (hour, minute) = figures.map_or((0, 0), |f| (f.hour.handshakes, f.minute.handshakes));
        std::cmp::Reverse((*active, hour, minute))
    });
    let snap = gate.snapshot();
    let mut other_active = 0;
    let mut other = snapshot.other.unwrap_or(CohortFigures {
        minute: CohortTally::default(),
        hour: CohortTally::default(),
    });
    let mut listed = Vec::new();
    for (i, (version, (active, figures))) in rows.into_iter().enumerate() {
        if i >= REPORTED_VERSIONS {
            other_active += active;
            if let Some(f) = figures {
                crate::census::window::Tally::merge(&mut other.minute, &f.minute);
                crate::census::window::Tally::merge(&mut other.hour, &f.hour);
            }
            continue;
        }
        let d = gate.decide(&snap, &version, "/");
        let mut row = figures_json(active, figures.as_ref());
        row["version"] = json!(label(&version));
        row["decision"] = json!(d.decider.action.as_str());
        row["rule"] = json!(&*d.decider.name);
        listed.push(row);
    }
    json!({
        "versions": listed,
        "other": figures_json(other_active, Some(&other)),
        "note": "decision is for path \"/\"; rules with path_prefix may decide other paths differently",
    })
}

fn figures_json(active: u64, figures: Option<&CohortFigures>) -> Value {
    let zero = CohortTally::default();
    let (minute, hour) = figures.map_or((&zero, &zero), |f| (&f.minute, &f.hour));
    let reasons = |t: &CohortTally| -> Value {
        REFUSAL_REASONS
            .iter()
            .zip(t.refused)
            .map(|(name, n)| ((*name).to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    json!({
        "active_connections": active,
        "handshakes_last_minute": minute.handshakes,
        "handshakes_last_hour": hour.handshakes,
        "admitted_last_minute": minute.admitted,
        "admitted_last_hour": hour.admitted,
        "held_back_last_minute": minute.held_back(),
        "held_back_last_hour": hour.held_back(),
        "refused_last_minute": reasons(minute),
        "refused_last_hour": reasons(hour),
    })
}

/// A version as listed: its canonical spelling, or `(missing)` / `(unparseable)`.
pub fn label(v: &VersionInput) -> String {
    match v {
        VersionInput::Parsed(v) => v.to_string(),
        VersionInput::Missing => "(missing)".into(),
        VersionInput::Unparseable => "(unparseable)".into(),
    }
}
