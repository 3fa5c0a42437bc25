//! `GET /v1/upstream`: how the backend is doing right now, from what this instance sees: its
//! answers over the last minute (time to the response head or 101, errors, timeouts) and the
//! connects and exchanges in progress.

use serde_json::{json, Value};

use crate::admin::versions::backend_json;
use crate::gate::Gate;

/// Error share of the last minute above which the backend is `failing`.
const FAILING_ERROR_RATE: f64 = 0.5;
/// Error share above which it is `degraded`.
const DEGRADED_ERROR_RATE: f64 = 0.05;

/// The backend's state: `idle` (no exchange in the last minute), `ok`, `degraded` (5% of
/// exchanges failed, or p99 above half the response timeout) or `failing` (half failed).
pub fn upstream(gate: &Gate) -> Value {
    let minute = gate.census.snapshot().all.minute;
    let attempts = minute.backend_attempts();
    let failed = u64::from(minute.backend_errors) + u64::from(minute.backend_timeouts);
    let rate = if attempts == 0 {
        0.0
    } else {
        failed as f64 / attempts as f64
    };
    let slow_ms = gate.config.upstream.response_timeout.as_secs_f64() * 1000.0 / 2.0;
    let p99_ms = minute.backend.quantile(0.99).map(|us| us / 1000.0);
    let state = if attempts == 0 {
        "idle"
    } else if rate >= FAILING_ERROR_RATE {
        "failing"
    } else if rate >= DEGRADED_ERROR_RATE || p99_ms.is_some_and(|p| p >= slow_ms) {
        "degraded"
    } else {
        "ok"
    };
    json!({
        "addr": gate.config.upstream.addr,
        "pending_connects": gate.metrics.upstream_pending.get(),
        "active": gate.metrics.upstream_active.get(),
        "last_minute": backend_json(&minute),
        "state": state,
    })
}
