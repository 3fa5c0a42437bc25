//! Crash-safe file replacement, for state that must never be seen half-written: the fleet's
//! last-known-good copy (and anything else that wants the same guarantee).
//!
//! The new content goes to a fresh temporary file in the same directory (created exclusively,
//! so two writers never share one), is flushed to disk, optionally the previous file is kept
//! as `<name>.bak`, then the temporary file is renamed over the target and the directory is
//! flushed so the rename itself survives a power cut. A reader sees the old file or the new
//! one, never a mix.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temporary files of concurrent writers within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The backup kept next to `path` by [`write_atomic`] with `keep_backup`.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".bak");
    PathBuf::from(p)
}

/// Replaces `path` with `bytes` atomically (see the module docs). With `keep_backup`, the file
/// being replaced (if any) is first copied to [`backup_path`]. Creates the parent directory.
/// The error names the step and the file.
pub fn write_atomic(path: &Path, bytes: &[u8], keep_backup: bool) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        f.write_all(bytes)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        f.sync_all()
            .map_err(|e| format!("cannot flush {} to disk: {e}", tmp.display()))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if keep_backup && path.exists() {
        let bak = backup_path(path);
        if let Err(e) = std::fs::copy(path, &bak) {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("cannot keep backup {}: {e}", bak.display()));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "cannot rename {} to {}: {e}",
            tmp.display(),
            path.display()
        ));
    }
    // The rename is durable only once the directory entry is on disk.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_keeps_the_previous_one_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        write_atomic(&path, b"one", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert!(!backup_path(&path).exists(), "nothing to back up yet");
        write_atomic(&path, b"two", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read(backup_path(&path)).unwrap(), b"one");
        write_atomic(&path, b"three", false).unwrap();
        assert_eq!(std::fs::read(backup_path(&path)).unwrap(), b"one");
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_failed_write_names_the_file_and_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"old", false).unwrap();
        // A directory where the file should be: the rename fails.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inner")).unwrap();
        let e = write_atomic(&blocked, b"x", false).unwrap_err();
        assert!(e.contains("blocked"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
}
