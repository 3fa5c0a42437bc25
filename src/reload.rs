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

/// Starts watching the rules file's directory; reloads go through [`Gate::reload`].
pub fn watch(gate: Arc<Gate>) -> Result<Option<RulesWatcher>, notify::Error> {
    let Some(path) = gate.config.rules_path.clone() else {
        return Ok(None);
    };
    let dir = watched_dir(&path);
    // Capacity 1 and try_send: a pending signal already means "re-read", so extras coalesce.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %dir.display(), file = %path.display(), "watching rules file");
    let task = tokio::spawn(async move {
        // The file may have changed between the initial load and the watch starting: compare
        // hashes once now rather than waiting for the periodic re-check.
        let _ = gate.reload(false).await;
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
            // Errors are logged, counted and kept for /v1/rules by reload itself.
            let _ = gate.reload(false).await;
        }
    });
    Ok(Some(RulesWatcher {
        _watcher: watcher,
        task,
    }))
}
