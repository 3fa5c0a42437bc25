//! Keeping the applied state equal to the store's: a full sync, then a watch from the last
//! seen revision + 1, forever.
//!
//! - **Resume**: after a broken stream the watch restarts from the last revision seen, so no
//!   change is missed and none is applied twice.
//! - **Compaction**: when etcd answers that the resume revision was compacted away, the whole
//!   state is read again and replaces what was applied (keys deleted meanwhile disappear).
//! - **Backoff**: reconnects wait a jittered, doubling delay ([`BACKOFF_BASE`] to [`BACKOFF_CAP`]),
//!   reset once a watch has stayed healthy for a while.
//! - **Stalls**: every third of `stall_timeout` a cheap read (keys and revisions under
//!   `state/`, no values) checks the stream from outside: if the store has held a change newer
//!   than what this instance applied for half of `stall_timeout` and the watch still has not
//!   delivered it, the watch is stalled and is reconnected (resuming, so nothing is lost). A
//!   failing check means the store is unreachable: the watch is dropped too, so the status says
//!   so. (Progress requests on the stream itself cannot be used over etcd 3.4's gateway, see
//!   [`super::etcd::watch`].)
//! - **Auth**: a watch cancelled or refused for its token re-authenticates on reconnect.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::etcd::types::{RangeRequest, WatchCreateRequest};
use super::etcd::EtcdError;
use super::keys::prefix_end;
use super::state::{self, Batch, Change};
use super::FleetCore;
use crate::gate::Gate;
use crate::killswitch;
use crate::metrics::FleetRestartReason;

/// First reconnect delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Keys read in a full sync: every entry, the rules, the stamp, and a margin for strays.
const FULL_SYNC_LIMIT: i64 = killswitch::MAX_ENTRIES as i64 + 64;
/// The same failure is logged at most this often while it repeats.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Doubling delay with equal jitter: half fixed, half random, so a fleet that lost the store
/// together does not reconnect together.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// Starts at [`BACKOFF_BASE`].
    pub fn new() -> Backoff {
        Backoff { attempt: 0 }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let exp = BACKOFF_BASE.saturating_mul(1u32 << self.attempt.min(16));
        let d = exp.min(BACKOFF_CAP);
        self.attempt = self.attempt.saturating_add(1);
        d / 2 + d.mul_f64(fastrand::f64() / 2.0)
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// Why a watch ended.
#[derive(Debug)]
enum End {
    /// The resume revision was compacted: a full sync is needed.
    Compacted(i64),
    /// The store's revision is behind what was seen (restored from a backup): full sync.
    Rewound(i64),
    /// The store has a change the watch did not deliver in time.
    Stalled,
    /// etcd closed the stream.
    Closed,
    /// A request or the stream failed.
    Failed(EtcdError),
    /// etcd cancelled the watch for another reason.
    Cancelled(String),
}

/// The sync task (runs until aborted).
pub async fn run(core: Arc<FleetCore>, gate: Arc<Gate>) {
    let mut backoff = Backoff::new();
    let mut need_full = true;
    let mut last_log: Option<(String, Instant)> = None;
    loop {
        let started = Instant::now();
        let end = if need_full {
            match full_sync(&core, &gate).await {
                Ok(()) => {
                    need_full = false;
                    watch(&core, &gate).await
                }
                Err(e) => End::Failed(e),
            }
        } else {
            watch(&core, &gate).await
        };
        let (reason, message) = match &end {
            End::Compacted(rev) => {
                need_full = true;
                (
                    FleetRestartReason::compacted,
                    format!("resume revision compacted (etcd kept revisions from {rev}); reading the whole state again"),
                )
            }
            End::Rewound(rev) => {
                need_full = true;
                (
                    FleetRestartReason::compacted,
                    format!("the store's revision {rev} is behind what this instance saw (restored from a backup?); reading the whole state again"),
                )
            }
            End::Stalled => (
                FleetRestartReason::stalled,
                format!(
                    "the watch did not deliver a change the store has had for up to {:?}; reconnecting",
                    core.config.stall_timeout
                ),
            ),
            End::Closed => (
                FleetRestartReason::closed,
                "etcd closed the watch stream; reconnecting".to_string(),
            ),
            End::Failed(e) => {
                if e.is_auth() {
                    core.client.invalidate_token().await;
                }
                (FleetRestartReason::error, e.to_string())
            }
            End::Cancelled(why) => {
                if why.contains("auth") || why.contains("token") {
                    core.client.invalidate_token().await;
                }
                (
                    FleetRestartReason::error,
                    format!("etcd cancelled the watch: {}", super::etcd::escape(why)),
                )
            }
        };
        core.metrics.fleet_watch_restart(reason);
        let resync = matches!(end, End::Compacted(_) | End::Rewound(_));
        if !resync {
            core.failed(&message);
        }
        let repeat = last_log
            .as_ref()
            .is_some_and(|(m, at)| *m == message && at.elapsed() < LOG_EVERY);
        if !repeat {
            tracing::warn!(store = %core.describe(), "{message}; the fleet state in force stays in force");
            last_log = Some((message, Instant::now()));
        }
        if started.elapsed() > core.config.stall_timeout {
            backoff.reset();
        }
        if !resync {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = core.store_back.notified() => {}
            }
        }
    }
}

/// Reads everything under `state/` and makes it the applied state.
async fn full_sync(core: &FleetCore, gate: &Gate) -> Result<(), EtcdError> {
    let (key, range_end) = core.keys.state_range();
    let r = core
        .client
        .range(&RangeRequest {
            key,
            range_end,
            limit: FULL_SYNC_LIMIT,
            ..Default::default()
        })
        .await?;
    if r.more {
        tracing::error!(
            count = r.count,
            limit = FULL_SYNC_LIMIT,
            "more keys under state/ than fwgate reads; only the first are applied"
        );
    }
    core.connected(r.header.revision);
    let count = r.kvs.len();
    state::apply(
        core,
        gate,
        Batch::Full {
            kvs: r.kvs,
            header_revision: r.header.revision,
        },
    )
    .await;
    tracing::info!(
        store = %core.describe(),
        revision = r.header.revision,
        keys = count,
        "fleet state synced from the store"
    );
    Ok(())
}

/// Watches from the last seen revision until the stream ends.
async fn watch(core: &FleetCore, gate: &Gate) -> End {
    let (key, _) = core.keys.state_range();
    let range_end = prefix_end(&key);
    let seen = core.view.lock().unwrap_or_else(|e| e.into_inner()).seen;
    let create = WatchCreateRequest {
        key,
        range_end,
        start_revision: seen + 1,
        progress_notify: false,
    };
    let mut stream = match core.client.watch(&create).await {
        Ok(s) => s,
        Err(e) => return End::Failed(e),
    };
    let mut check = tokio::time::interval(core.config.stall_timeout / 3);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    // A store revision under state/ not applied yet, and when a check first saw it. Measured
    // in time rather than in checks: on a loaded machine a tick or the check's own read can
    // come late, and an event still in flight is not a stall.
    let mut behind: Option<(i64, Instant)> = None;
    loop {
        tokio::select! {
            next = stream.next() => {
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => return End::Closed,
                    Err(e) => return End::Failed(e),
                };
                if msg.canceled {
                    if msg.compact_revision > 0 {
                        return End::Compacted(msg.compact_revision);
                    }
                    return End::Cancelled(msg.cancel_reason);
                }
                if msg.compact_revision > 0 {
                    return End::Compacted(msg.compact_revision);
                }
                core.connected(msg.header.revision);
                if msg.events.is_empty() {
                    continue;
                }
                let changes = msg
                    .events
                    .into_iter()
                    .map(|ev| {
                        if ev.is_delete() {
                            Change::Delete {
                                key: ev.kv.key,
                                mod_revision: ev.kv.mod_revision,
                            }
                        } else {
                            Change::Put(ev.kv)
                        }
                    })
                    .collect();
                state::apply(core, gate, Batch::Events(changes)).await;
            }
            _ = check.tick() => {
                let (newest, store) = match newest_state_revision(core).await {
                    Ok(r) => r,
                    Err(e) => return End::Failed(e),
                };
                let (applied, seen) = {
                    let view = core.view.lock().unwrap_or_else(|e| e.into_inner());
                    (view.revision, view.seen)
                };
                if store < seen {
                    return End::Rewound(store);
                }
                behind = match behind {
                    _ if newest <= applied => None,
                    // The change first seen missing is still missing.
                    Some((rev, since)) if rev > applied => {
                        if since.elapsed() >= core.config.stall_timeout / 2 {
                            return End::Stalled;
                        }
                        Some((rev, since))
                    }
                    _ => Some((newest, Instant::now())),
                };
            }
        }
    }
}

/// The newest change under `state/` in the store (keys and revisions only), and the store's
/// revision.
async fn newest_state_revision(core: &FleetCore) -> Result<(i64, i64), EtcdError> {
    let (key, range_end) = core.keys.state_range();
    let r = core
        .client
        .range(&RangeRequest {
            key,
            range_end,
            limit: FULL_SYNC_LIMIT,
            keys_only: true,
            ..Default::default()
        })
        .await?;
    core.connected(r.header.revision);
    Ok((
        r.kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0),
        r.header.revision,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(
            first >= BACKOFF_BASE / 2 && first <= BACKOFF_BASE,
            "{first:?}"
        );
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= BACKOFF_CAP, "{d:?}");
        }
        assert!(b.next_delay() >= BACKOFF_CAP / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_BASE);
    }
}
