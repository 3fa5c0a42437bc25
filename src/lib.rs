//! fwgate: a firmware-version admission proxy.
//!
//! It stands in front of a device backend, reads each device's firmware version from the
//! connection handshake, decides with hot-reloaded rules whether to admit it, and forwards only
//! what it admits. A refused handshake never reaches the backend.
//!
//! # Layout
//!
//! - [`version`]: lenient parsing of firmware versions and the two orderings (`firmware`, `semver`).
//! - [`rules`]: ranges as sets on the total order, the rules file, the compiled [`rules::RuleSet`]
//!   with its binary-search index, and the [`rules::Decision`].
//! - [`extract`]: where the version and device id come from (header, header + regex, query).
//! - [`config`]: process settings (`fwgate.toml`), validated in two stages.
//! - [`gate`]: the shared admission state: rules snapshot (arc-swap), metrics, registry, backend.
//! - [`proxy`]: accept loop, admission service, forwarding, upgrade tunnels.
//! - [`reload`]: watching the rules file's directory; [`admin`]: the admin listener and its
//!   incident console (`GET /`, [`admin::console`]).
//! - [`killswitch`]: emergency entries decided before every rule, persisted and audited.
//! - [`fleet`]: fleet mode: kill-switch entries (and optionally the rules) shared through etcd,
//!   produced as snapshots the gate swaps in through the seam in [`shared`].
//! - [`limits`]: rule `limit` actions (GCRA via governor), concurrency caps, global caps, reconnect backoff.
//! - [`registry`]: open tunnels, so a rule change can close what it no longer admits.
//! - [`census`]: which versions are connecting and what was done with them, for `/v1/versions`.
//! - [`path`]: the one spelling of a request path that rules see and the backend gets.
//! - [`audit`]: the recent audit trail of changes, for `/v1/audit` and the console.
//! - [`metrics`], [`access_log`], [`logging`], [`diag`], [`duration`], [`atomic_file`]: supporting pieces.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod atomic_file;
pub mod audit;
pub mod census;
pub mod cli;
pub mod clock;
pub mod config;
pub mod diag;
pub mod duration;
pub mod extract;
pub mod fleet;
pub mod gate;
pub mod kill_cli;
pub mod killswitch;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod path;
pub mod preview_cli;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod rules;
pub mod shared;
pub mod tls;
pub mod version;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

/// What a WebSocket device is told when the shutdown drain closes its tunnel (with 1013, Try
/// Again Later: another instance will take it).
pub const SHUTDOWN_CLOSE_REASON: &str = "fwgate shutting down; reconnect";

use crate::admin::{Admin, AdminToken};
use crate::gate::Gate;

/// Already-bound listeners: tests bind `127.0.0.1:0`, `main` binds the configured addresses.
pub struct Listeners {
    /// Device-facing listener.
    pub proxy: TcpListener,
    /// Admin listener.
    pub admin: TcpListener,
    /// TLS for the device listener (see [`TlsListener::from_config`]).
    pub tls: Option<TlsListener>,
}

/// TLS termination for the device listener: the server configuration in force and the watcher
/// that reloads the certificate and the client CA when their files change (new handshakes use
/// the new ones; open connections are unaffected).
pub struct TlsListener {
    config: tls::SharedServerConfig,
    _watcher: tls::CertWatcher,
}

impl TlsListener {
    /// Loads and validates the configured files and starts watching them; `None` without `[tls]`.
    /// Must run inside the tokio runtime.
    pub fn from_config(config: &config::Config) -> Result<Option<TlsListener>, tls::TlsError> {
        let Some(files) = &config.tls else {
            return Ok(None);
        };
        let key = tls::load_certified_key(files)?;
        let resolver = tls::ReloadingCert::new(key);
        let server = tls::server_config(files, resolver.clone())?;
        let shared = std::sync::Arc::new(arc_swap::ArcSwap::new(server));
        let watcher = tls::watch_tls_files(files.clone(), resolver, Some(shared.clone()))?;
        Ok(Some(TlsListener {
            config: shared,
            _watcher: watcher,
        }))
    }

    /// Performs handshakes with the configuration in force now (one atomic load).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }
}

/// Runs fwgate until `shutdown` resolves: the proxy, the admin API, the watchers, and in fleet
/// mode the fleet member (its last-known-good copy is put in force before anything is served).
/// On shutdown: readiness turns 503, no new connections are accepted, in-flight HTTP exchanges
/// finish and open tunnels are closed spread over `shutdown_grace`, then it returns.
pub async fn run(
    listeners: Listeners,
    gate: Arc<Gate>,
    token: AdminToken,
    shutdown: impl Future<Output = ()>,
) {
    let fleet = match (&gate.config.fleet, listeners.admin.local_addr()) {
        (None, _) => None,
        (Some(_), Ok(admin)) => match fleet::Fleet::start(gate.clone(), admin).await {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(error = %e, "cannot join the fleet; refusing every device until restarted with a working [fleet]");
                None
            }
        },
        (Some(_), Err(e)) => {
            tracing::error!(error = %e, "cannot read the admin address; refusing every device");
            None
        }
    };
    let watcher = match reload::watch(gate.clone(), reload::Watched::Rules) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the rules file; reload with SIGHUP or POST /v1/reload");
            None
        }
    };
    let kill_watcher = match reload::watch(gate.clone(), reload::Watched::KillSwitch) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the kill-switch state file; use the API or restart to apply hand edits");
            None
        }
    };
    let sweeper = tokio::spawn({
        let gate = gate.clone();
        async move {
            // Every second the census clock moves (so counting a request reads no clock);
            // every SWEEP_INTERVAL the limiters, pools and metric series are swept.
            let mut tick = tokio::time::interval(census::CLOCK_TICK);
            let sweep_every = (limits::SWEEP_INTERVAL.as_millis()
                / census::CLOCK_TICK.as_millis().max(1))
            .max(1) as u64;
            let mut ticks = 0u64;
            loop {
                tick.tick().await;
                gate.census.tick();
                ticks += 1;
                if ticks % sweep_every == 1 {
                    gate.sweep_limits();
                    gate.upstream.sweep_idle();
                    gate.metrics.prune_rule_series();
                }
            }
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await.map(|_| ());
    };
    let admin = Arc::new(Admin {
        gate: gate.clone(),
        token,
    });
    let admin_task = tokio::spawn(admin::serve(
        listeners.admin,
        admin,
        stopped(stop_rx.clone()),
    ));
    let proxy_task = tokio::spawn(proxy::serve(
        listeners.proxy,
        listeners.tls.map(Arc::new),
        gate.clone(),
        stopped(stop_rx),
    ));

    shutdown.await;
    let grace = gate.config.shutdown_grace;
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        tunnels = gate.registry.len(),
        "shutting down: not ready, refusing new connections, finishing in-flight requests, closing tunnels over the grace period"
    );
    gate.start_draining();
    drop(watcher);
    drop(kill_watcher);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    // Tunnels are closed gradually so the fleet reconnects to other instances in a trickle,
    // the last early enough to finish its WebSocket close within the grace period.
    let reason = registry::close_reason(SHUTDOWN_CLOSE_REASON);
    let spread = grace.saturating_sub(proxy::tunnel::WS_CLOSE_WAIT);
    gate.registry
        .plan_close(|t| {
            (t.kind == registry::TrackedKind::Tunnel).then(|| registry::CloseOrder {
                drain: spread,
                cause: registry::CloseCause::Shutdown,
                reason: Some(reason.clone()),
            })
        })
        .execute(|| {});
    if tokio::time::timeout_at(deadline, proxy_task).await.is_err() {
        tracing::warn!("shutdown grace elapsed with requests still in flight");
    }
    while !gate.registry.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin_task.abort();
    sweeper.abort();
    if let Some(f) = fleet {
        f.stop().await;
    }
}
