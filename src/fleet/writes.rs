//! Kill-switch changes through the store: compare-and-set, audited, then waited for.
//!
//! Each change is one etcd transaction: *if the entry's key is still at the revision this
//! instance last saw (or the caller's `expect`)*, write (or delete) it, add an audit record
//! (who, when, why, before, after) and rewrite the change stamp. If someone changed the entry
//! in between, nothing is written and the caller gets a conflict naming what is there now;
//! an identical entry already in place (the CLI sending the same `add` to several instances)
//! counts as done. Then the call waits, at most [`CONVERGENCE_WAIT`], until this instance and
//! every live instance report the change's revision, and names the ones that do not.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::etcd::types::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use super::etcd::EtcdError;
use super::keys::{unix_ms, AuditRecord, Stamp};
use super::state::parse_entry;
use super::status::wait_for_revision;
use super::FleetCore;
use crate::killswitch::{self, EntrySpec, KillSwitchError};
use crate::shared::{BoxFuture, Convergence, SharedChange, SharedStore};

/// Longest a change waits for the fleet to apply it before answering.
pub const CONVERGENCE_WAIT: Duration = Duration::from_secs(5);
/// Expired entries removed from the store per change (the rest go with later changes).
const PRUNE_PER_CHANGE: usize = 16;

/// The fleet's store, as the gate sees it.
pub struct FleetStore {
    core: Arc<FleetCore>,
}

impl FleetStore {
    /// Wraps the fleet's shared state.
    pub fn new(core: Arc<FleetCore>) -> FleetStore {
        FleetStore { core }
    }
}

impl SharedStore for FleetStore {
    fn describe(&self) -> String {
        self.core.describe()
    }

    fn add_entry<'a>(
        &'a self,
        spec: &'a EntrySpec,
        expect: Option<i64>,
        dry_run: bool,
    ) -> BoxFuture<'a, Result<SharedChange, KillSwitchError>> {
        Box::pin(add(&self.core, spec, expect, dry_run))
    }

    fn remove_entry<'a>(
        &'a self,
        id: &'a str,
        actor: Option<&'a str>,
        expect: Option<i64>,
    ) -> BoxFuture<'a, Result<Option<(EntrySpec, SharedChange)>, KillSwitchError>> {
        Box::pin(remove(&self.core, id, actor, expect))
    }

    fn status(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(super::status::status_json(&self.core))
    }
}

/// What the store error means for the operator: 503 naming the store, and whether anything
/// may have been written.
fn unavailable(core: &FleetCore, e: EtcdError) -> KillSwitchError {
    if e.outcome_unknown() {
        KillSwitchError::Unavailable(format!(
            "fleet store {}: {e}. The change may or may not have been stored: check with `fwgate kill list` before retrying",
            core.describe()
        ))
    } else {
        KillSwitchError::Unavailable(format!(
            "fleet store {}: {e}. Nothing was changed. To refuse on this instance only while the store is unreachable: `fwgate kill add ... --local` (?scope=local)",
            core.describe()
        ))
    }
}

/// Same entry apart from when it was created (the CLI's fan-out to several instances).
fn same_entry(a: &EntrySpec, b: &EntrySpec) -> bool {
    let mut a = a.clone();
    a.created_at = b.created_at;
    a == *b
}

fn json_bytes<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp::RequestPut(PutRequest {
        key,
        value,
        lease: 0,
    })
}

/// The key's current value from a failed transaction's `failure` range.
fn current_of(r: TxnResponse) -> Option<super::etcd::types::KeyValue> {
    r.responses
        .into_iter()
        .next()
        .and_then(|op| op.response_range)
        .and_then(|rr| rr.kvs.into_iter().next())
}

fn describe_entry(spec: &EntrySpec) -> String {
    format!(
        "versions {:?}, reason {:?}, by {}",
        spec.versions,
        spec.reason,
        spec.created_by.as_deref().unwrap_or("-")
    )
}

async fn add(
    core: &FleetCore,
    spec: &EntrySpec,
    expect: Option<i64>,
    dry_run: bool,
) -> Result<SharedChange, KillSwitchError> {
    let key = core.keys.entry(&spec.id);
    let now = killswitch::unix_now();
    let (seen, before, others) = {
        let view = core.view.lock().unwrap_or_else(|e| e.into_inner());
        let seen = view.entries.get(&spec.id);
        let others = view
            .entries
            .values()
            .filter(|a| a.value.id != spec.id && a.value.expires_at.is_none_or(|x| now < x))
            .count();
        (
            seen.map_or(0, |a| a.mod_revision),
            seen.map(|a| a.value.clone()),
            others,
        )
    };
    if others + 1 > killswitch::MAX_ENTRIES {
        return Err(KillSwitchError::Invalid(format!(
            "at most {} kill-switch entries in the fleet; remove some first",
            killswitch::MAX_ENTRIES
        )));
    }
    let expected = expect.unwrap_or(seen);
    if dry_run {
        // Everything a real add needs: the store answers, and the expectation holds.
        let r = core
            .client
            .range(&RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(core, e))?;
        let current = r.kvs.first().map_or(0, |kv| kv.mod_revision);
        if expect.is_some_and(|e| e != current) {
            return Err(KillSwitchError::Conflict(format!(
                "entry {:?} is at revision {current} in the store, not {expected}",
                spec.id
            )));
        }
        return Ok(SharedChange { convergence: None });
    }
    let at_ms = unix_ms();
    let audit = AuditRecord::entry(
        "kill_add",
        &spec.id,
        spec.created_by.as_deref(),
        &core.instance_id,
        before.as_ref(),
        Some(spec),
    );
    let txn = TxnRequest {
        compare: vec![Compare::mod_revision_is(key.clone(), expected)],
        success: vec![
            put(key.clone(), json_bytes(spec)),
            put(core.keys.audit(at_ms, "kill_add"), json_bytes(&audit)),
            put(
                core.keys.stamp(),
                json_bytes(&Stamp {
                    at_ms,
                    action: "kill_add".into(),
                    subject: spec.id.clone(),
                }),
            ),
        ],
        failure: vec![RequestOp::RequestRange(RangeRequest {
            key: key.clone(),
            ..Default::default()
        })],
    };
    let r = core
        .client
        .txn(&txn)
        .await
        .map_err(|e| unavailable(core, e))?;
    let revision = if r.succeeded {
        r.header.revision
    } else {
        let ordering = crate::version::VersionOrdering::Firmware;
        let current = current_of(r);
        if let Some(e) = expect {
            return Err(KillSwitchError::Conflict(match current {
                Some(kv) => format!(
                    "entry {:?} is at revision {} in the fleet store, not at revision {e} as expected",
                    spec.id, kv.mod_revision
                ),
                None => format!(
                    "entry {:?} is not in the fleet store, not at revision {e} as expected",
                    spec.id
                ),
            }));
        }
        match current {
            Some(kv) => match parse_entry(&spec.id, &kv.value, ordering) {
                Ok(current) if same_entry(&current, spec) => kv.mod_revision,
                Ok(current) => {
                    return Err(KillSwitchError::Conflict(format!(
                        "entry {:?} was changed in the fleet store (revision {}, {}) since this instance saw it at revision {expected}; list it with `fwgate kill list` and try again",
                        spec.id,
                        kv.mod_revision,
                        describe_entry(&current)
                    )))
                }
                Err(_) => {
                    return Err(KillSwitchError::Conflict(format!(
                        "entry {:?} was changed in the fleet store (revision {}) since this instance saw it at revision {expected}; try again",
                        spec.id, kv.mod_revision
                    )))
                }
            },
            None => {
                return Err(KillSwitchError::Conflict(format!(
                    "entry {:?} was removed from the fleet store since this instance saw it at revision {expected}; try again",
                    spec.id
                )))
            }
        }
    };
    tracing::warn!(target: "fwgate::audit", action = "kill_add", scope = "fleet", id = %spec.id, versions = %spec.versions, reason = %spec.reason, by = spec.created_by.as_deref().unwrap_or("-"), expires_at = ?spec.expires_at, revision, "kill-switch entry added to the fleet store");
    prune_expired(core, &spec.id).await;
    Ok(SharedChange {
        convergence: Some(wait_converged(core, revision).await),
    })
}

async fn remove(
    core: &FleetCore,
    id: &str,
    actor: Option<&str>,
    expect: Option<i64>,
) -> Result<Option<(EntrySpec, SharedChange)>, KillSwitchError> {
    let key = core.keys.entry(id);
    let seen = {
        let view = core.view.lock().unwrap_or_else(|e| e.into_inner());
        view.entries
            .get(id)
            .map(|a| (a.mod_revision, a.value.clone()))
    };
    let (expected, before) = match seen {
        Some((rev, spec)) => (expect.unwrap_or(rev), spec),
        None => {
            // Not applied here (yet): remove what the store has.
            let r = core
                .client
                .range(&RangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable(core, e))?;
            let Some(kv) = r.kvs.into_iter().next() else {
                return Ok(None);
            };
            let spec = parse_entry(id, &kv.value, crate::version::VersionOrdering::Firmware)
                .map_err(|e| {
                    KillSwitchError::Invalid(format!(
                        "entry {id:?} in the fleet store is invalid ({e}); delete the key {} with etcdctl",
                        String::from_utf8_lossy(&key)
                    ))
                })?;
            (expect.unwrap_or(kv.mod_revision), spec)
        }
    };
    let at_ms = unix_ms();
    let audit = AuditRecord::entry(
        "kill_remove",
        id,
        actor,
        &core.instance_id,
        Some(&before),
        None,
    );
    let txn = TxnRequest {
        compare: vec![Compare::mod_revision_is(key.clone(), expected)],
        success: vec![
            RequestOp::RequestDeleteRange(DeleteRangeRequest {
                key: key.clone(),
                range_end: Vec::new(),
            }),
            put(core.keys.audit(at_ms, "kill_remove"), json_bytes(&audit)),
            put(
                core.keys.stamp(),
                json_bytes(&Stamp {
                    at_ms,
                    action: "kill_remove".into(),
                    subject: id.to_string(),
                }),
            ),
        ],
        failure: vec![RequestOp::RequestRange(RangeRequest {
            key: key.clone(),
            ..Default::default()
        })],
    };
    let r = core
        .client
        .txn(&txn)
        .await
        .map_err(|e| unavailable(core, e))?;
    if !r.succeeded {
        return match current_of(r) {
            None => Ok(None),
            Some(kv) if expect.is_some() => Err(KillSwitchError::Conflict(format!(
                "entry {id:?} is at revision {} in the fleet store, not at revision {expected} as expected",
                kv.mod_revision
            ))),
            Some(kv) => Err(KillSwitchError::Conflict(format!(
                "entry {id:?} was changed in the fleet store (revision {}) since this instance saw it at revision {expected}; list it with `fwgate kill list` and try again",
                kv.mod_revision
            ))),
        };
    }
    let revision = r.header.revision;
    tracing::warn!(target: "fwgate::audit", action = "kill_remove", scope = "fleet", id = %id, versions = %before.versions, by = actor.unwrap_or("-"), revision, "kill-switch entry removed from the fleet store");
    Ok(Some((
        before,
        SharedChange {
            convergence: Some(wait_converged(core, revision).await),
        },
    )))
}

/// Removes a few expired entries from the store (each with its own compare-and-set, so an
/// entry re-added meanwhile is kept). Best effort: expiry is enforced locally anyway.
async fn prune_expired(core: &FleetCore, except: &str) {
    let now = killswitch::unix_now();
    let expired: Vec<(String, i64, EntrySpec)> = {
        let view = core.view.lock().unwrap_or_else(|e| e.into_inner());
        view.entries
            .values()
            .filter(|a| a.value.id != except && a.value.expires_at.is_some_and(|x| x <= now))
            .take(PRUNE_PER_CHANGE)
            .map(|a| (a.value.id.clone(), a.mod_revision, a.value.clone()))
            .collect()
    };
    for (id, revision, spec) in expired {
        let at_ms = unix_ms();
        let audit = AuditRecord::entry(
            "kill_expire",
            &id,
            Some("fwgate"),
            &core.instance_id,
            Some(&spec),
            None,
        );
        let txn = TxnRequest {
            compare: vec![Compare::mod_revision_is(core.keys.entry(&id), revision)],
            success: vec![
                RequestOp::RequestDeleteRange(DeleteRangeRequest {
                    key: core.keys.entry(&id),
                    range_end: Vec::new(),
                }),
                put(core.keys.audit(at_ms, "kill_expire"), json_bytes(&audit)),
            ],
            failure: Vec::new(),
        };
        if let Err(e) = core.client.txn(&txn).await {
            tracing::debug!(id = %id, error = %e, "could not prune an expired entry");
            return;
        }
    }
}

/// Waits until this instance and every live instance report `revision` (at most
/// [`CONVERGENCE_WAIT`]).
async fn wait_converged(core: &FleetCore, revision: i64) -> Convergence {
    let started = Instant::now();
    let deadline = started + CONVERGENCE_WAIT;
    let mut applied = core.applied.subscribe();
    let _ = tokio::time::timeout_at(deadline, applied.wait_for(|r| *r >= revision)).await;
    wait_for_revision(
        &core.client,
        &core.keys,
        core.config.heartbeat_interval,
        revision,
        started,
        deadline,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_entry_sent_twice_is_not_a_conflict() {
        let a: EntrySpec = serde_json::from_str(
            r#"{"id":"x","versions":"*","reason":"r","created_at":1,"created_by":"ops"}"#,
        )
        .unwrap();
        let mut b = a.clone();
        b.created_at = 5;
        assert!(same_entry(&a, &b));
        b.reason = "other".into();
        assert!(!same_entry(&a, &b));
    }
}
