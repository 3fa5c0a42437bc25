//! `GET /v1/versions` and `GET /v1/timeline`: the census as JSON. The census only counts;
//! this joins its figures with the open connections (registry), the rules and kill switch in
//! force, and the suspects, and suggests what an operator could run against a suspect
//! cohort. The console renders exactly this.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::census::suspects::{self, Suspicion};
use crate::census::window::Tally;
use crate::census::{CohortFigures, CohortTally, REFUSAL_REASONS, TIMELINE_REFUSALS};
use crate::gate::Gate;
use crate::rules::VersionInput;

/// Versions listed in a report; the rest are summed into `other`.
pub const REPORTED_VERSIONS: usize = 100;

/// The census report: suspects first (worst first), then by open connections and the last
/// hour's handshakes; each version with what was admitted and refused, the backend's answers,
/// how its tunnels ended, and today's decision.
pub fn report(gate: &Gate) -> Value {
    let snapshot = gate.census.snapshot();
    let suspicions = suspects::find(&snapshot.cohorts, &snapshot.all);
    let mut rows: HashMap<VersionInput, Row> = snapshot
        .cohorts
        .into_iter()
        .zip(suspicions)
        .map(|((version, figures), suspicion)| {
            (
                version,
                Row {
                    active: 0,
                    figures: Some(figures),
                    suspicion,
                },
            )
        })
        .collect();
    gate.registry.for_each(|t| {
        rows.entry(t.version)
            .or_insert(Row {
                active: 0,
                figures: None,
                suspicion: None,
            })
            .active += 1;
    });
    let mut rows: Vec<(VersionInput, Row)> = rows.into_iter().collect();
    rows.sort_by(|(_, a), (_, b)| {
        b.rank()
            .partial_cmp(&a.rank())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let snap = gate.snapshot();
    let mut other_active = 0;
    let mut other = snapshot.other;
    let mut listed = Vec::new();
    let mut suspects = 0;
    for (i, (version, row)) in rows.into_iter().enumerate() {
        if i >= REPORTED_VERSIONS {
            other_active += row.active;
            if let Some(f) = row.figures {
                other.minute.merge(&f.minute);
                other.hour.merge(&f.hour);
            }
            continue;
        }
        let d = gate.decide(&snap, &version, "/");
        let mut out = figures_json(row.active, row.figures.as_ref());
        out["version"] = json!(label(&version));
        out["decision"] = json!(d.decider.action.as_str());
        out["rule"] = json!(&*d.decider.name);
        out["suspect"] = match &row.suspicion {
            Some(s) => {
                suspects += 1;
                suggestion(&version, s, row.active, row.figures.as_ref())
            }
            None => Value::Null,
        };
        listed.push(out);
    }
    json!({
        "versions": listed,
        "suspects": suspects,
        "other": figures_json(other_active, Some(&other)),
        "note": "decision is for path \"/\"; rules with path_prefix may decide other paths differently; suspects are suggestions, nothing is enforced on its own",
    })
}

struct Row {
    active: u64,
    figures: Option<CohortFigures>,
    suspicion: Option<Suspicion>,
}

impl Row {
    /// Suspects first (worst first), then open connections, then the hour's and minute's
    /// handshakes.
    fn rank(&self) -> (f64, u64, u32, u32) {
        let (hour, minute) = self
            .figures
            .map_or((0, 0), |f| (f.hour.handshakes, f.minute.handshakes));
        (
            self.suspicion.as_ref().map_or(0.0, |s| s.severity),
            self.active,
            hour,
            minute,
        )
    }
}

/// What an operator could run against a suspect cohort: a kill-switch entry refusing exactly
/// this version, or a `limit` rule throttling it to half its current pace.
fn suggestion(
    version: &VersionInput,
    s: &Suspicion,
    active: u64,
    figures: Option<&CohortFigures>,
) -> Value {
    let (kill_command, limit_rule) = match version {
        VersionInput::Parsed(v) => {
            let per_minute = figures.map_or(0, |f| f.minute.handshakes);
            (
                Value::from(format!(
                    "fwgate kill add '={v}' --reason 'backend trouble from {v} (console suspect)' --ttl 1h"
                )),
                Value::from(format!(
                    "[[rule]]\nname = \"throttle-{v}\"\nversions = \"={v}\"\naction = \"limit\"\nrate = \"{}/m\"\nmax_connections = {}\n",
                    (per_minute / 2).max(1),
                    active.max(1)
                )),
            )
        }
        VersionInput::Missing => (
            Value::Null,
            Value::from("[defaults]\nmissing = \"deny\"   # devices that send no version\n"),
        ),
        VersionInput::Unparseable => (
            Value::Null,
            Value::from("[defaults]\nunparseable = \"deny\"\n"),
        ),
    };
    json!({
        "reasons": s.reasons,
        "kill_command": kill_command,
        "limit_rule": limit_rule,
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
        "backend_last_minute": backend_json(minute),
        "backend_last_hour": backend_json(hour),
        "tunnels_last_minute": tunnels_json(minute),
        "tunnels_last_hour": tunnels_json(hour),
    })
}

/// Backend answers of a window: samples, p50/p99 in ms (null without samples), failures.
pub fn backend_json(t: &CohortTally) -> Value {
    json!({
        "samples": t.backend.count(),
        "p50_ms": t.backend.quantile(0.5).map(micros_to_ms),
        "p99_ms": t.backend.quantile(0.99).map(micros_to_ms),
        "errors": t.backend_errors,
        "timeouts": t.backend_timeouts,
    })
}

fn tunnels_json(t: &CohortTally) -> Value {
    json!({
        "ended": t.tunnels_ended,
        "short": t.short_tunnels,
        "median_lifetime_s": t.lifetime.quantile(0.5).map(|ms| round3(ms / 1000.0)),
    })
}

fn micros_to_ms(micros: f64) -> f64 {
    round3(micros / 1000.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `GET /v1/timeline`: the instance's decisions and backend time, 10-second slots over the
/// last 15 minutes, oldest first.
pub fn timeline(gate: &Gate) -> Value {
    let slots: Vec<Value> = gate
        .census
        .timeline()
        .into_iter()
        .map(|(t, tally)| {
            let refused: serde_json::Map<String, Value> = TIMELINE_REFUSALS
                .iter()
                .zip(tally.refused)
                .map(|(name, n)| ((*name).to_string(), json!(n)))
                .collect();
            json!({
                "t": t,
                "admitted": tally.admitted,
                "refused": refused,
                "backend_p50_ms": tally.backend.quantile(0.5).map(micros_to_ms),
                "backend_p99_ms": tally.backend.quantile(0.99).map(micros_to_ms),
                "backend_errors": tally.backend_errors,
            })
        })
        .collect();
    json!({
        "slot_seconds": crate::census::timeline::SLOT_SECS,
        "slots": slots,
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
