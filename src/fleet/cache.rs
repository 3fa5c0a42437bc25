//! The last-known-good copy of the fleet state in `state_dir/fleet-state.json`: the fleet's
//! kill-switch entries and the last rules document that compiled, with the store revision.
//!
//! Written atomically (see [`crate::atomic_file`]) after every applied change, with the
//! previous copy kept as `.bak`. At start-up it is what an instance enforces until it reaches
//! the store, so a restart during a store outage keeps every entry in force. A copy for another
//! prefix (another fleet) is ignored; an unreadable copy falls back to the backup loudly; with
//! neither, the instance refuses every device until it has synced.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::keys::RulesDoc;
use crate::killswitch::EntrySpec;

/// File name in `state_dir`.
pub const CACHE_FILE: &str = "fleet-state.json";
/// A copy larger than this is refused (the store's own limits keep it far smaller).
pub const MAX_CACHE_BYTES: u64 = 16 << 20;

/// The copy as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    /// Format version (1).
    pub version: u32,
    /// The `[fleet] prefix` it was taken under.
    pub prefix: String,
    /// Store revision of the state.
    pub revision: i64,
    /// When it was written, unix milliseconds.
    pub saved_at_ms: u64,
    /// The fleet's kill-switch entries.
    pub entries: Vec<CachedEntry>,
    /// The last rules document that compiled (with `rules = true`).
    pub rules: Option<CachedRules>,
}

/// One entry with its store revisions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachedEntry {
    /// Revision of its last change.
    pub mod_revision: i64,
    /// Revision of its creation (listing order).
    pub create_revision: i64,
    /// The entry.
    pub spec: EntrySpec,
}

/// The rules document with its revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachedRules {
    /// Revision of its last change.
    pub mod_revision: i64,
    /// The document.
    pub doc: RulesDoc,
}

/// Where the copy lives.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(CACHE_FILE)
}

fn read(path: &Path) -> Result<Option<CacheFile>, String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
        Ok(m) if m.len() > MAX_CACHE_BYTES => {
            return Err(format!(
                "{}: {} bytes, more than {MAX_CACHE_BYTES}",
                path.display(),
                m.len()
            ))
        }
        Ok(_) => {}
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let file: CacheFile = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{}: invalid at line {} column {}: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    if file.version != 1 {
        return Err(format!(
            "{}: format version {} is not 1",
            path.display(),
            file.version
        ));
    }
    Ok(Some(file))
}

/// Loads the copy for `prefix`: the file, else (loudly) its backup. `Ok(None)` when there is
/// none for this prefix; `Err` when copies exist and none is usable (the caller then has no
/// copy, which refuses devices: never looser).
pub fn load(path: &Path, prefix: &str) -> Result<Option<CacheFile>, String> {
    let chosen = match read(path) {
        Ok(c) => c,
        Err(primary) => {
            let bak = crate::atomic_file::backup_path(path);
            match read(&bak) {
                Ok(Some(c)) => {
                    tracing::error!(error = %primary, backup = %bak.display(), "fleet state copy unusable; using its backup");
                    Some(c)
                }
                Ok(None) => return Err(format!("{primary}; no backup")),
                Err(e) => return Err(format!("{primary}; backup unusable too: {e}")),
            }
        }
    };
    match chosen {
        Some(c) if c.prefix != prefix => {
            tracing::warn!(file = %path.display(), cached = %c.prefix, configured = %prefix, "fleet state copy is for another prefix; ignoring it");
            Ok(None)
        }
        other => Ok(other),
    }
}

/// Writes the copy atomically, keeping the previous one as `.bak`.
pub fn save(path: &Path, file: &CacheFile) -> Result<(), String> {
    let mut bytes = serde_json::to_vec_pretty(file)
        .map_err(|e| format!("cannot encode the fleet state copy: {e}"))?;
    bytes.push(b'\n');
    crate::atomic_file::write_atomic(path, &bytes, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(prefix: &str, revision: i64) -> CacheFile {
        CacheFile {
            version: 1,
            prefix: prefix.into(),
            revision,
            saved_at_ms: 1,
            entries: vec![CachedEntry {
                mod_revision: revision,
                create_revision: revision,
                spec: serde_json::from_str(
                    r#"{"id":"a","versions":"*","reason":"r","created_at":1}"#,
                )
                .unwrap(),
            }],
            rules: None,
        }
    }

    #[test]
    fn round_trip_backup_and_prefix_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert!(load(&p, "/fwgate/").unwrap().is_none());
        save(&p, &sample("/fwgate/", 5)).unwrap();
        save(&p, &sample("/fwgate/", 6)).unwrap();
        assert_eq!(load(&p, "/fwgate/").unwrap().unwrap().revision, 6);
        assert!(load(&p, "/other/").unwrap().is_none());
        std::fs::write(&p, b"{ broken").unwrap();
        assert_eq!(load(&p, "/fwgate/").unwrap().unwrap().revision, 5);
        std::fs::write(crate::atomic_file::backup_path(&p), b"also broken").unwrap();
        let e = load(&p, "/fwgate/").unwrap_err();
        assert!(e.contains(CACHE_FILE), "{e}");
    }
}
