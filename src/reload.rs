//! Hot reload of the rules file.
//!
//! Editors and tools replace files in many ways (in place, temp file + rename, vim's backup
//! dance, delete + recreate, Kubernetes' `..data` symlink swap). A watch on the file itself
//! dies after the first rename, so fwgate watches the file's *parent directory* as configured
//! (not canonicalised: a ConfigMap's canonical path points into a directory that gets deleted),
//! reacts to any event there, waits for a quiet period, re-reads the configured path and skips
//! the reload when the content hash is unchanged. A slow periodic re-check catches missed events.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::gate::Gate;

/// Quiet period after a file event before reloading: editors write in bursts.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Longest a burst of events can delay a reload.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(1000);
/// Periodic re-check for events the OS did not deliver (e.g. some network filesystems).
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Keeps the directory watch alive; dropping it stops watching.
pub struct RulesWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RulesWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The directory to watch for `path`, as configured.
fn watched_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Which file a watcher keeps in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// The rules file ([`Gate::reload`]).
    Rules,
    /// The kill-switch state file ([`Gate::reload_killswitch`]).
    KillSwitch,
}

async fn apply(gate: &Gate, what: Watched) {
    match what {
        // Errors are logged, counted and kept for /v1/rules by reload itself.
        Watched::Rules => {
            let _ = gate.reload(false).await;
        }
        Watched::KillSwitch => gate.reload_killswitch().await,
    }
}

/// Starts watching a file's directory; changes go through [`Gate::reload`] or
/// [`Gate::reload_killswitch`].
pub fn watch(gate: Arc<Gate>, what: Watched) -> Result<Option<RulesWatcher>, notify::Error> {
    let path = match what {
        Watched::Rules => gate.config.rules_path.clone(),
        Watched::KillSwitch => gate.kill_state_file().map(Path::to_path_buf),
    };
    let Some(path) = path else {
        return Ok(None);
    };
    if what == Watched::KillSwitch {
        if let Some(dir) = path.parent() {
            // The state directory may not exist before the first entry is written.
            let _ = std::fs::create_dir_all(dir);
        }
    }
    let dir = watched_dir(&path);
    // Capacity 1 and try_send: a pending signal already means "re-read", so extras coalesce.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %dir.display(), file = %path.display(), ?what, "watching file");
    let task = tokio::spawn(async move {
        // The file may have changed between the initial load and the watch starting: compare
        // hashes once now rather than waiting for the periodic re-check.
        apply(&gate, what).await;
        let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
        recheck.tick().await;
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
                    while let Ok(Some(())) = tokio::time::timeout_at(
                        deadline.min(tokio::time::Instant::now() + DEBOUNCE),
                        rx.recv(),
                    )
                    .await
                    {}
                }
                _ = recheck.tick() => {}
            }
            apply(&gate, what).await;
        }
    });
    Ok(Some(RulesWatcher {
        _watcher: watcher,
        task,
    }))
}
