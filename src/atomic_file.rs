//! Crash-safe file replacement, for state that must never be seen half-written: the fleet's
//! last-known-good copy (and anything else that wants the same guarantee).
//!
//! The new content goes to `<name>.tmp` next to the target, created exclusively and never
//! through a symlink, with mode [`FILE_MODE`]; it is flushed to disk; optionally the previous
//! file is kept as `<name>.bak` by a hard link (no byte of it is written again, so a full disk
//! cannot truncate the backup); then the temp file is renamed over the target and the directory
//! is flushed so the rename itself survives a power cut. A reader sees the old file or the new
//! one, never a mix; any failure leaves both as they were and removes the temp files. One
//! writer per path at a time (the caller serialises).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Mode of the files written: the owner (fwgate's user) only.
pub const FILE_MODE: u32 = 0o600;

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The backup kept next to `path` by [`write_atomic`] with `keep_backup`.
pub fn backup_path(path: &Path) -> PathBuf {
    with_suffix(path, ".bak")
}

/// Removes the temp files a crashed or failed write may have left; a symlink planted at a temp
/// name is removed, not followed.
fn remove_temp_files(path: &Path) {
    for stale in [
        with_suffix(path, ".tmp"),
        with_suffix(&backup_path(path), ".tmp"),
    ] {
        let _ = std::fs::remove_file(stale);
    }
}

/// Replaces `path` with `bytes` atomically (see the module docs). With `keep_backup`, the file
/// being replaced (if any) is kept as [`backup_path`]. Creates the parent directory. The error
/// names the step and the file.
pub fn write_atomic(path: &Path, bytes: &[u8], keep_backup: bool) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create directory {}: {e}", dir.display()))?;
    remove_temp_files(path);
    let result = replace(path, bytes, keep_backup);
    if result.is_err() {
        remove_temp_files(path);
    }
    result?;
    // The rename is durable only once the directory entry is on disk.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The steps that can fail half-way; the caller cleans up after them.
fn replace(path: &Path, bytes: &[u8], keep_backup: bool) -> Result<(), String> {
    let tmp = with_suffix(path, ".tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    // The mode given at creation is narrowed by the umask, never widened; set it exactly.
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .map_err(|e| format!("cannot set the mode of {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.sync_all()
        .map_err(|e| format!("cannot flush {} to disk: {e}", tmp.display()))?;
    drop(f);
    if keep_backup {
        match std::fs::symlink_metadata(path) {
            Ok(_) => {
                let bak = backup_path(path);
                let bak_tmp = with_suffix(&bak, ".tmp");
                std::fs::hard_link(path, &bak_tmp)
                    .and_then(|()| std::fs::rename(&bak_tmp, &bak))
                    .map_err(|e| {
                        format!("cannot keep the previous file as {}: {e}", bak.display())
                    })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
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
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn stale_temp_files_and_planted_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("state.json.tmp")).unwrap();
        write_atomic(&path, b"new", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
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
        assert!(!dir.path().join("blocked.tmp").exists());
    }
}
