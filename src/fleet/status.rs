//! Convergence you can see: the live instances with the revision each has applied (from their
//! heartbeats), and `GET /v1/fleet`, which `fwgate fleet status` and the CLI's waits read too.

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use tokio::time::Instant;

use super::etcd::types::RangeRequest;
use super::etcd::{Client, EtcdError};
use super::keys::{unix_ms, Heartbeat, Keys};
use super::FleetCore;
use crate::shared::{Convergence, Lagging};

/// Most instances listed (a fleet is tens, not thousands).
pub const MAX_INSTANCES: i64 = 1000;
/// How long `/v1/fleet` waits for the instance list before answering without it.
const LIST_TIMEOUT: Duration = Duration::from_secs(2);

/// One instance, from its heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    /// Instance id.
    pub id: String,
    /// The state revision it has in force.
    pub applied_revision: i64,
    /// Seconds since its last heartbeat.
    pub age_s: f64,
    /// Its admin address.
    pub admin: String,
    /// fwgate version.
    pub version: String,
    /// `etcd` or `cache`.
    pub source: String,
    /// Heard from recently (see [`silence_limit`]); silent ones are listed but not waited for.
    pub live: bool,
}

/// An instance not heard from for this long is considered gone (its lease has not expired yet).
pub fn silence_limit(heartbeat_interval: Duration) -> Duration {
    heartbeat_interval * 3 + Duration::from_secs(1)
}

/// Reads every heartbeat, sorted by id.
pub async fn list_instances(
    client: &Client,
    keys: &Keys,
    heartbeat_interval: Duration,
) -> Result<Vec<InstanceInfo>, EtcdError> {
    let (key, range_end) = keys.instances_range();
    let r = client
        .range(&RangeRequest {
            key,
            range_end,
            limit: MAX_INSTANCES,
            ..Default::default()
        })
        .await?;
    let now = unix_ms();
    let silence = silence_limit(heartbeat_interval).as_secs_f64();
    let mut list: Vec<InstanceInfo> = r
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Heartbeat>(&kv.value).ok())
        .map(|h| {
            let age_s = now.saturating_sub(h.at_ms) as f64 / 1000.0;
            InstanceInfo {
                id: h.id,
                applied_revision: h.applied_revision,
                age_s,
                admin: h.admin,
                version: h.version,
                source: h.source,
                live: age_s <= silence,
            }
        })
        .collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(list)
}

/// Whether every live instance has the same revision in force.
pub fn converged(instances: &[InstanceInfo]) -> bool {
    let mut live = instances
        .iter()
        .filter(|i| i.live)
        .map(|i| i.applied_revision);
    match live.next() {
        None => true,
        Some(first) => live.all(|r| r == first),
    }
}

/// How often the instance list is read while waiting for a revision.
const POLL: Duration = Duration::from_millis(20);

/// Waits until every live instance reports `revision` or `deadline` passes; names the ones
/// that lag. `started` is when the caller's wait began (for `waited_ms`).
pub async fn wait_for_revision(
    client: &Client,
    keys: &Keys,
    heartbeat_interval: Duration,
    revision: i64,
    started: Instant,
    deadline: Instant,
) -> Convergence {
    loop {
        let listed =
            tokio::time::timeout_at(deadline, list_instances(client, keys, heartbeat_interval))
                .await;
        let now = Instant::now();
        let waited_ms = now.duration_since(started).as_millis() as u64;
        match listed {
            Ok(Ok(list)) => {
                let live: Vec<_> = list.into_iter().filter(|i| i.live).collect();
                let lagging: Vec<Lagging> = live
                    .iter()
                    .filter(|i| i.applied_revision < revision)
                    .map(|i| Lagging {
                        id: i.id.clone(),
                        applied_revision: i.applied_revision,
                        age_s: i.age_s,
                    })
                    .collect();
                if lagging.is_empty() || now >= deadline {
                    return Convergence {
                        revision,
                        applied: live
                            .iter()
                            .filter(|i| i.applied_revision >= revision)
                            .map(|i| i.id.clone())
                            .collect(),
                        lagging,
                        waited_ms,
                        unknown: None,
                    };
                }
            }
            Ok(Err(e)) if now >= deadline => {
                return Convergence {
                    revision,
                    waited_ms,
                    unknown: Some(e.to_string()),
                    ..Convergence::default()
                }
            }
            Ok(Err(_)) => {}
            Err(_) => {
                return Convergence {
                    revision,
                    waited_ms,
                    unknown: Some("the instance list did not arrive in time".into()),
                    ..Convergence::default()
                }
            }
        }
        tokio::time::sleep_until((Instant::now() + POLL).min(deadline)).await;
    }
}

/// `GET /v1/fleet`.
pub async fn status_json(core: &FleetCore) -> Value {
    let status = core.status();
    let (revision, entries, rules) = {
        let view = core.view.lock().unwrap_or_else(|e| e.into_inner());
        (
            view.revision,
            view.entries.len(),
            view.rules.as_ref().map(|r| {
                json!({
                    "seq": r.value.seq,
                    "hash": r.value.hash,
                    "author": r.value.author,
                    "published_at_ms": r.value.published_at_ms,
                    "revision": r.mod_revision,
                })
            }),
        )
    };
    let listed = tokio::time::timeout(
        LIST_TIMEOUT,
        list_instances(&core.client, &core.keys, core.config.heartbeat_interval),
    )
    .await
    .unwrap_or_else(|_| {
        Err(EtcdError::Unreachable {
            store: core.client.describe().to_string(),
            detail: format!("no instance list within {LIST_TIMEOUT:?}"),
        })
    });
    let (instances, instances_error) = match listed {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    json!({
        "instance": core.instance_id,
        "store": {
            "kind": "etcd",
            "endpoints": core.config.endpoints.iter().map(|e| e.url.as_str()).collect::<Vec<_>>(),
            "prefix": core.keys.prefix(),
            "connected": status.connected,
            "revision": status.store_revision,
            "source": status.source.as_str(),
            "last_error": status.last_error,
            "last_error_at_ms": status.last_error_at_ms,
            "last_invalid_document": status.last_invalid_document,
        },
        "applied_revision": revision,
        "entries": entries,
        "rules_from_store": core.config.rules,
        "rules": rules,
        "converged": instances_error.is_none() && converged(&instances),
        "instances": instances,
        "instances_error": instances_error,
    })
}
