//! Fleet mode: one kill switch (and optionally one rule set) for every instance, kept in etcd.
//!
//! This module owns everything about the store; the gate never sees it. It *produces* the
//! state the gate swaps in (the fleet's kill-switch entries, the rules text) through the seam
//! in [`crate::shared`], and implements that seam's [`crate::shared::SharedStore`] so that
//! kill-switch changes made through any instance's admin API go to the store.
//!
//! # Parts
//!
//! - [`etcd`]: a typed client for etcd's v3 JSON gateway over hyper (no protoc, no tonic).
//! - [`keys`]: the key layout under the prefix and the documents stored there.
//! - [`state`]: what this instance has applied, and how a batch of store changes is applied.
//! - [`sync`]: the watch loop: full sync, resume from the last revision, resync after a
//!   compaction, jittered reconnect backoff, stall detection, re-authentication.
//! - [`cache`]: the last-known-good copy in `state_dir`, enforced until the store answers.
//! - [`heartbeat`]: each instance's applied revision under a lease, for convergence.
//! - [`writes`]: compare-and-set kill-switch changes with audit records, and the wait for
//!   every live instance to apply them.
//! - [`publish`]: rules push, history, diff, rollback; [`status`]: `/v1/fleet`;
//!   [`cli`]: what `fwgate rules` and `fwgate fleet status` print.
//!
//! # Never looser than the last known state
//!
//! A running instance keeps enforcing what it applied through a store outage; a restarted one
//! starts from its copy; one with neither refuses every device (503, `Retry-After`) and is not
//! ready until it has synced. Expiry is checked by each instance at decision time, so it works
//! while the store is down. Writes while the store is unreachable fail with a 503 naming it.

pub mod cache;
pub mod cli;
pub mod etcd;
pub mod heartbeat;
pub mod keys;
pub mod publish;
pub mod state;
pub mod status;
pub mod sync;
pub mod writes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::FleetConfig;
use crate::gate::Gate;
use crate::metrics::Metrics;
use etcd::Client;
use keys::Keys;
use state::View;

/// Where the state in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Nothing yet: every device is refused.
    None,
    /// The last-known-good copy in `state_dir` (the store has not answered since start).
    Cache,
    /// The store.
    Etcd,
}

impl Source {
    /// `none`, `cache` or `etcd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Cache => "cache",
            Source::Etcd => "etcd",
        }
    }
}

/// The connection to the store, as `/v1/fleet` shows it.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    /// A watch is established (or the last request succeeded).
    pub connected: bool,
    /// Where the state in force came from.
    pub source: Source,
    /// The store's revision at the last contact.
    pub store_revision: i64,
    /// The last failure (escaped), kept after recovery for context.
    pub last_error: Option<String>,
    /// When it happened, unix milliseconds.
    pub last_error_at_ms: Option<u64>,
    /// The last document refused from the store (key: why), if any.
    pub last_invalid_document: Option<String>,
}

/// What the fleet's tasks share.
pub struct FleetCore {
    /// `[fleet]`.
    pub config: FleetConfig,
    /// The etcd client.
    pub client: Client,
    /// Key layout.
    pub keys: Keys,
    /// This instance's id.
    pub instance_id: String,
    /// This instance's admin address, as reported in heartbeats.
    pub admin: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// What this instance has applied.
    pub view: Mutex<View>,
    /// The connection's state.
    pub status: Mutex<StoreStatus>,
    /// The applied state revision (heartbeats and change waiters follow it).
    pub applied: watch::Sender<i64>,
    /// The last-known-good copy.
    pub cache_path: PathBuf,
    /// The heartbeat lease (0: none yet).
    pub lease: Mutex<i64>,
    /// Woken when a call succeeds after the store was unreachable (a heartbeat, a write), so
    /// the watch reconnects at once instead of at the end of its backoff: an instance that
    /// answers heartbeats is expected by writers to follow changes too.
    pub store_back: Notify,
}

impl FleetCore {
    /// Records a successful contact with the store.
    pub fn connected(&self, store_revision: i64) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let was = std::mem::replace(&mut s.connected, true);
        s.store_revision = s.store_revision.max(store_revision);
        drop(s);
        self.metrics.fleet_connected(true);
        if !was {
            // Only a watch waiting right now: no permit is kept, so the watch's own
            // reconnect (which also lands here) cannot cut a later backoff short.
            self.store_back.notify_waiters();
        }
    }

    /// Records a failure to reach or use the store.
    pub fn failed(&self, error: &str) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.connected = false;
        s.last_error = Some(etcd::escape(error));
        s.last_error_at_ms = Some(keys::unix_ms());
        drop(s);
        self.metrics.fleet_connected(false);
    }

    /// A copy of the connection's state.
    pub fn status(&self) -> StoreStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `etcd <endpoints> prefix <prefix>`.
    pub fn describe(&self) -> String {
        format!("{} prefix {}", self.client.describe(), self.keys.prefix())
    }
}

/// The running fleet member: its tasks stop when this is dropped.
pub struct Fleet {
    core: Arc<FleetCore>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// This machine's host name (Kubernetes: the pod name).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .take(100)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fwgate".into())
}

impl Fleet {
    /// Joins the fleet: loads the last-known-good copy and puts it in force (else the gate keeps
    /// refusing everything), connects the gate's kill-switch changes to the store, and starts
    /// the watch and heartbeat tasks. Call before serving. Fails only on local setup problems
    /// (TLS or password files); the gate then keeps refusing everything.
    pub async fn start(gate: Arc<Gate>, admin: SocketAddr) -> Result<Fleet, String> {
        let config = gate
            .config
            .fleet
            .clone()
            .ok_or_else(|| "fleet mode is off ([fleet] is not configured)".to_string())?;
        let state_dir = gate
            .config
            .state_dir
            .clone()
            .ok_or_else(|| "[fleet] needs state_dir".to_string())?;
        let client = Client::new(&config).map_err(|e| e.to_string())?;
        let instance_id = config
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", hostname(), admin.port()));
        let (applied, _) = watch::channel(0);
        let core = Arc::new(FleetCore {
            keys: Keys::new(&config.prefix),
            client,
            instance_id,
            admin: admin.to_string(),
            metrics: gate.metrics.clone(),
            view: Mutex::new(View::default()),
            status: Mutex::new(StoreStatus {
                connected: false,
                source: Source::None,
                store_revision: 0,
                last_error: None,
                last_error_at_ms: None,
                last_invalid_document: None,
            }),
            applied,
            cache_path: cache::path(&state_dir),
            lease: Mutex::new(0),
            store_back: Notify::new(),
            config,
        });
        core.metrics.fleet_connected(false);
        match cache::load(&core.cache_path, core.keys.prefix()) {
            Ok(Some(copy)) => state::install_copy(&core, &gate, copy).await,
            Ok(None) => tracing::warn!(
                store = %core.describe(),
                "no last-known-good fleet state copy: refusing every device until the store answers"
            ),
            Err(e) => tracing::error!(
                store = %core.describe(),
                error = %e,
                "fleet state copy unusable: refusing every device until the store answers"
            ),
        }
        gate.attach_shared_store(Arc::new(writes::FleetStore::new(core.clone())));
        tracing::info!(
            store = %core.describe(),
            instance = %core.instance_id,
            rules_from_store = core.config.rules,
            "fleet mode"
        );
        let tasks = vec![
            tokio::spawn(sync::run(core.clone(), gate)),
            tokio::spawn(heartbeat::run(core.clone())),
        ];
        Ok(Fleet { core, tasks })
    }

    /// This instance's id in the fleet.
    pub fn instance_id(&self) -> &str {
        &self.core.instance_id
    }

    /// Leaves the fleet: stops the tasks and revokes the heartbeat lease (bounded), so the
    /// instance disappears from `/v1/fleet` at once instead of after the lease expires.
    pub async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        heartbeat::leave(&self.core).await;
    }
}
