//! Each instance reports itself under `P instances/<id>`: the state revision it has in force,
//! when, its admin address. The key is attached to a lease of [`LEASE_INTERVALS`] heartbeat
//! intervals, so a crashed instance disappears on its own and a stopped one revokes its lease
//! at once. A heartbeat is written every `heartbeat_interval` and right after every applied
//! change, so a writer waiting for the fleet to converge sees it within milliseconds.

use std::sync::Arc;
use std::time::Duration;

use super::etcd::types::PutRequest;
use super::etcd::EtcdError;
use super::keys::{unix_ms, Heartbeat};
use super::FleetCore;

/// Lease lifetime in heartbeat intervals (at least 5 s).
pub const LEASE_INTERVALS: u32 = 5;
/// How long leaving may take at shutdown.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);

fn lease_ttl_secs(interval: Duration) -> i64 {
    (interval * LEASE_INTERVALS).as_secs().max(5) as i64
}

/// The heartbeat task (runs until aborted).
pub async fn run(core: Arc<FleetCore>) {
    let mut applied = core.applied.subscribe();
    let mut failing = false;
    loop {
        match beat(&core).await {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(store = %core.describe(), error = %e, "heartbeat failed; retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(core.config.heartbeat_interval) => {}
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// One heartbeat: renew (or obtain) the lease, then write the report under it.
async fn beat(core: &FleetCore) -> Result<(), EtcdError> {
    let mut lease = *core.lease.lock().unwrap_or_else(|e| e.into_inner());
    if lease != 0 {
        let alive = core.client.lease_keepalive(lease).await?;
        if alive.ttl <= 0 {
            lease = 0;
        }
    }
    if lease == 0 {
        lease = core
            .client
            .lease_grant(lease_ttl_secs(core.config.heartbeat_interval))
            .await?
            .id;
        *core.lease.lock().unwrap_or_else(|e| e.into_inner()) = lease;
    }
    let status = core.status();
    let report = Heartbeat {
        id: core.instance_id.clone(),
        applied_revision: *core.applied.borrow(),
        at_ms: unix_ms(),
        admin: core.admin.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        source: status.source.as_str().to_string(),
    };
    let value = serde_json::to_vec(&report).unwrap_or_default();
    let put = PutRequest {
        key: core.keys.instance(&core.instance_id),
        value,
        lease,
    };
    match core.client.put(&put).await {
        Err(e) if e.is_lease_not_found() => {
            *core.lease.lock().unwrap_or_else(|e| e.into_inner()) = 0;
            Err(e)
        }
        other => other.map(|_| ()),
    }
}

/// Revokes the lease so the instance leaves the fleet's list at once (bounded, best effort).
pub async fn leave(core: &FleetCore) {
    let lease = std::mem::take(&mut *core.lease.lock().unwrap_or_else(|e| e.into_inner()));
    if lease == 0 {
        return;
    }
    match tokio::time::timeout(LEAVE_TIMEOUT, core.client.lease_revoke(lease)).await {
        Ok(Ok(())) => tracing::info!(instance = %core.instance_id, "left the fleet"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not revoke the heartbeat lease; the instance disappears when it expires")
        }
        Err(_) => tracing::warn!(
            "could not revoke the heartbeat lease in time; the instance disappears when it expires"
        ),
    }
}
