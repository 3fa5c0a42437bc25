//! The seam between the gate and a store shared by a fleet of instances.
//!
//! The gate keeps deciding from local, immutable snapshots. A shared store (the [`crate::fleet`]
//! module, on etcd) *produces* those snapshots (the fleet's kill-switch entries, the rules
//! text) and hands them in through [`crate::gate::Gate::install_shared_entries`] and
//! [`crate::gate::Gate::install_shared_rules`], the same swap a file reload uses. In the other
//! direction, kill-switch changes made through the admin API go out through [`SharedStore`],
//! so neither the gate nor the admin API knows which store it is.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;

use crate::killswitch::{EntrySpec, KillSwitchError};

/// A boxed, sendable future (what [`SharedStore`]'s methods return).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How far a change made through the store has spread when the answer is sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Convergence {
    /// Store revision of the change.
    pub revision: i64,
    /// Live instances that have applied it.
    pub applied: Vec<String>,
    /// Live instances that had not applied it when the wait ended.
    pub lagging: Vec<Lagging>,
    /// How long the wait took, in milliseconds.
    pub waited_ms: u64,
    /// Why the wait could not tell (e.g. the instance list could not be read), if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

/// An instance that had not applied a change in time.
#[derive(Debug, Clone, Serialize)]
pub struct Lagging {
    /// Instance id.
    pub id: String,
    /// The revision it had applied at its last heartbeat.
    pub applied_revision: i64,
    /// Seconds since that heartbeat.
    pub age_s: f64,
}

/// A kill-switch change that went through the store.
#[derive(Debug, Clone)]
pub struct SharedChange {
    /// How far it spread (`None` for a dry run, which changes nothing).
    pub convergence: Option<Convergence>,
}

/// Where kill-switch entries live when they are shared by a fleet. Implementations write with
/// compare-and-set, leave an audit record, and return once this instance has applied the
/// change (and, within a bound, every live instance has). When the store cannot be reached
/// they fail with [`KillSwitchError::Unavailable`] naming it: a change never silently applies
/// to one instance only.
pub trait SharedStore: Send + Sync {
    /// The store, for messages and listings (e.g. `etcd http://10.0.0.7:2379 prefix /fwgate/`).
    fn describe(&self) -> String;

    /// Adds or replaces the entry `spec.id`. `expect` is the store revision the caller last saw
    /// for that id (0: must not exist); `None` uses what this instance last applied. A dry run
    /// checks everything a real write would (store reachable, entry cap, expectation) and
    /// changes nothing.
    fn add_entry<'a>(
        &'a self,
        spec: &'a EntrySpec,
        expect: Option<i64>,
        dry_run: bool,
    ) -> BoxFuture<'a, Result<SharedChange, KillSwitchError>>;

    /// Removes the entry `id`; `Ok(None)` when the store has no such entry.
    fn remove_entry<'a>(
        &'a self,
        id: &'a str,
        actor: Option<&'a str>,
        expect: Option<i64>,
    ) -> BoxFuture<'a, Result<Option<(EntrySpec, SharedChange)>, KillSwitchError>>;

    /// The store's and the fleet's state, for `GET /v1/fleet`.
    fn status(&self) -> BoxFuture<'_, serde_json::Value>;
}
