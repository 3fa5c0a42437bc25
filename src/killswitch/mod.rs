//! The emergency kill switch: entries that refuse a version range (or everything: `*`,
//! maintenance mode) before any rule, fleet-wide in seconds.
//!
//! Entries are persisted in `state_dir/killswitch.json`, written atomically (temp file created
//! exclusively, fsync, rename) before an API call answers, with the previous version kept as
//! `killswitch.json.bak` by a hard link (see [`write_state`] for how faults are survived). A corrupt file falls back to the backup loudly. The set in force is
//! swapped atomically like the rules, so a handshake that arrives after the API call returned
//! is decided with the new entry. Expired entries stop applying on their own (checked at
//! decision time) and are pruned from the file at the next change.

pub mod layers;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::duration::{format_duration, parse_duration};
use crate::metrics::Metrics;
use crate::rules::range::VersionRange;
use crate::rules::{Action, Decider, Refusal, VersionInput};
use crate::version::{FirmwareVersion, VersionOrdering};

/// Status of a kill-switch refusal unless the entry says otherwise.
pub const DEFAULT_STATUS: u16 = 503;
/// Base Retry-After unless the entry says otherwise.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Retry-After spread unless the entry says otherwise (±50%).
pub const DEFAULT_JITTER: f64 = 0.5;
/// Over how long matching open connections are closed unless the entry says otherwise.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);
/// File name of the state in `state_dir`.
pub const STATE_FILE: &str = "killswitch.json";
/// What a missing state file means (no entries), hashed like a real file so that a missing file
/// at start and a missing file seen by the watcher compare equal.
pub const EMPTY_STATE: &[u8] = b"{\"entries\":[]}";
/// Most entries in force at once (each is checked on every handshake).
pub const MAX_ENTRIES: usize = 256;
/// Longest `reason` in bytes: it is logged and sent in the body of every refusal it makes.
pub const MAX_REASON_BYTES: usize = 1024;

/// One entry as persisted and as shown by the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// Stable id (also used by `fwgate kill rm` across a fleet).
    pub id: String,
    /// Range refused (`*` refuses everything, including missing and unparseable versions).
    pub versions: String,
    /// Why; required, shown in logs and listings.
    pub reason: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds after which the entry no longer applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Refusal status.
    #[serde(default = "default_status")]
    pub status: u16,
    /// Base Retry-After, e.g. `"300s"`.
    #[serde(default = "default_retry_after")]
    pub retry_after: String,
    /// Retry-After spread (0-1).
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Close open connections it matches.
    #[serde(default = "default_true")]
    pub close_existing: bool,
    /// Over how long, e.g. `"10s"`.
    #[serde(default = "default_drain")]
    pub drain: String,
    /// Who created it (from the CLI's actor header), for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

fn default_status() -> u16 {
    DEFAULT_STATUS
}
fn default_retry_after() -> String {
    format_duration(DEFAULT_RETRY_AFTER)
}
fn default_jitter() -> f64 {
    DEFAULT_JITTER
}
fn default_true() -> bool {
    true
}
fn default_drain() -> String {
    format_duration(DEFAULT_DRAIN)
}

/// The persisted file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Format version (1).
    #[serde(default = "one")]
    pub version: u32,
    /// Entries in creation order.
    pub entries: Vec<EntrySpec>,
}

fn one() -> u32 {
    1
}

/// What an API client sends to create an entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEntry {
    /// Range to refuse.
    pub versions: String,
    /// Why (required).
    pub reason: String,
    /// Optional id; generated when absent. Reusing an id replaces that entry.
    pub id: Option<String>,
    /// Lifetime, e.g. `"2h"`.
    pub ttl: Option<String>,
    /// Absolute expiry (unix seconds); alternative to `ttl`.
    pub expires_at: Option<u64>,
    /// Refusal status (400-599), default 503.
    pub status: Option<u16>,
    /// Base Retry-After, default `"300s"`.
    pub retry_after: Option<String>,
    /// Retry-After spread, default 0.5.
    pub jitter: Option<f64>,
    /// Close matching open connections (default true).
    pub close_existing: Option<bool>,
    /// Spread of those closures, default `"10s"`.
    pub drain: Option<String>,
}

/// Where an entry in force comes from (shown as `"scope"` in listings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This instance only, persisted in `state_dir/killswitch.json`.
    Local,
    /// The fleet's shared store.
    Fleet {
        /// Store revision of the entry's last change (for compare-and-set).
        revision: i64,
    },
    /// Put in force by fwgate itself: refusing everything until the fleet state is known.
    System,
}

impl Scope {
    /// `local`, `fleet` or `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Fleet { .. } => "fleet",
            Scope::System => "system",
        }
    }
}

/// A compiled entry: its spec, range and decider.
#[derive(Debug, Clone)]
pub struct Entry {
    /// As persisted.
    pub spec: EntrySpec,
    /// Compiled range.
    pub range: VersionRange,
    /// Name `killswitch:<id>`, the refusal, counters.
    pub decider: Decider,
    /// Where it comes from ([`Scope::Local`] unless a layer says otherwise).
    pub scope: Scope,
}

impl Entry {
    /// Whether it still applies at `now` (unix seconds).
    pub fn active_at(&self, now: u64) -> bool {
        self.spec.expires_at.is_none_or(|e| now < e)
    }

    /// Whether it refuses this version (maintenance `*` also refuses missing/unparseable).
    pub fn matches(&self, version: &VersionInput) -> bool {
        match version {
            VersionInput::Parsed(v) => self.range.contains(v),
            _ => self.range.matches_everything(),
        }
    }
}

/// The entries in force (immutable; swapped whole).
#[derive(Debug, Default)]
pub struct KillSet {
    /// Entries in creation order.
    pub entries: Vec<Entry>,
}

impl KillSet {
    /// The first active entry refusing `version`, if any. No allocation; cost grows with the
    /// (small, bounded) number of entries.
    pub fn find(&self, version: &VersionInput) -> Option<&Entry> {
        if self.entries.is_empty() {
            return None;
        }
        let now = unix_now();
        self.entries
            .iter()
            .find(|e| e.active_at(now) && e.matches(version))
    }

    /// Entries still active now.
    pub fn active(&self) -> impl Iterator<Item = &Entry> {
        let now = unix_now();
        self.entries.iter().filter(move |e| e.active_at(now))
    }

    /// The specs, for persistence.
    pub fn specs(&self) -> Vec<EntrySpec> {
        self.entries.iter().map(|e| e.spec.clone()).collect()
    }
}

/// Why an entry or a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    /// The request or entry is invalid; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing the state file failed.
    #[error("{path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The fleet's shared store could not be reached or did not confirm the change; the message
    /// names the store. Nothing was applied anywhere (or, when the store went silent after the
    /// request was sent, the message says the outcome is unknown).
    #[error("{0}")]
    Unavailable(String),
    /// Someone else changed the entry since this instance last saw it (compare-and-set failed).
    #[error("{0}")]
    Conflict(String),
}

/// Current unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A fresh id: `ks-<unix seconds>-<4 hex>`.
pub fn generate_id() -> String {
    format!("ks-{}-{:04x}", unix_now(), fastrand::u16(..))
}

/// Validates an API request into a spec (with `created_at` now).
pub fn spec_from_request(
    req: NewEntry,
    ordering: VersionOrdering,
    actor: Option<String>,
) -> Result<EntrySpec, KillSwitchError> {
    let invalid = |m: String| Err(KillSwitchError::Invalid(m));
    if req.reason.trim().is_empty() {
        return invalid("reason is required: say why (it is shown in logs and listings)".into());
    }
    if req.reason.trim().len() > MAX_REASON_BYTES {
        return invalid(format!(
            "reason is {} bytes; at most {MAX_REASON_BYTES}: it is sent to every refused device, so keep it short and link to the incident",
            req.reason.trim().len()
        ));
    }
    let id = req.id.unwrap_or_else(generate_id);
    if !valid_id(&id) {
        return invalid(format!(
            "id {id:?} must be 1-64 characters of letters, digits, '-', '_', '.'"
        ));
    }
    let range = VersionRange::parse(&req.versions, ordering)
        .map_err(|e| KillSwitchError::Invalid(format!("versions {:?}: {e}", req.versions)))?;
    // In a rules file this is a warning; mid-incident, refusing 3.6.0 alone while 3.6.5 keeps
    // connecting is too easy to miss, so a new entry must say which one it means.
    if let Some(partial) = range.partial_bare_versions().first() {
        let exact = match FirmwareVersion::parse(&partial.written) {
            Ok(v) => v.to_string(),
            Err(_) => partial.written.clone(),
        };
        return invalid(format!(
            "versions {:?}: a bare {:?} means exactly {exact}, so {} would still connect; write {:?} for the whole line or \"={exact}\" for that one version",
            req.versions,
            partial.written,
            // An example the entry would miss: 3.6.5 for `3.6`, 3.1.0 for `3`.
            if partial.suggestion.matches('.').count() == 2 {
                partial.suggestion.replace('*', "5")
            } else {
                partial.suggestion.replace('*', "1.0")
            },
            partial.suggestion,
        ));
    }
    let now = unix_now();
    let expires_at = match (req.ttl, req.expires_at) {
        (Some(_), Some(_)) => return invalid("give ttl or expires_at, not both".into()),
        (Some(ttl), None) => {
            let d =
                parse_duration(&ttl).map_err(|e| KillSwitchError::Invalid(format!("ttl: {e}")))?;
            if d.is_zero() {
                return invalid("ttl must be more than 0".into());
            }
            Some(now + d.as_secs().max(1))
        }
        (None, Some(at)) => Some(at),
        (None, None) => None,
    };
    let spec = EntrySpec {
        id,
        versions: req.versions,
        reason: req.reason.trim().to_string(),
        created_at: now,
        expires_at,
        status: req.status.unwrap_or(DEFAULT_STATUS),
        retry_after: req.retry_after.unwrap_or_else(default_retry_after),
        jitter: req.jitter.unwrap_or(DEFAULT_JITTER),
        close_existing: req.close_existing.unwrap_or(true),
        drain: req.drain.unwrap_or_else(default_drain),
        created_by: actor,
    };
    // Validates status, durations and jitter the same way a loaded file is validated.
    compile_entry(spec.clone(), ordering, &Metrics::new())?;
    Ok(spec)
}

/// Compiles one spec.
pub fn compile_entry(
    spec: EntrySpec,
    ordering: VersionOrdering,
    metrics: &Metrics,
) -> Result<Entry, KillSwitchError> {
    let bad = |m: String| KillSwitchError::Invalid(format!("entry {:?}: {m}", spec.id));
    if !valid_id(&spec.id) {
        return Err(bad("invalid id".into()));
    }
    let range = VersionRange::parse(&spec.versions, ordering)
        .map_err(|e| bad(format!("versions {:?}: {e}", spec.versions)))?;
    let status = StatusCode::from_u16(spec.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .ok_or_else(|| bad(format!("status {} must be 400-599", spec.status)))?;
    let retry_after =
        parse_duration(&spec.retry_after).map_err(|e| bad(format!("retry_after: {e}")))?;
    let drain = parse_duration(&spec.drain).map_err(|e| bad(format!("drain: {e}")))?;
    if !(0.0..=1.0).contains(&spec.jitter) {
        return Err(bad(format!(
            "jitter {} must be between 0 and 1",
            spec.jitter
        )));
    }
    let name = format!("killswitch:{}", spec.id);
    let body = format!(
        "refused by emergency kill switch {}: {}\n",
        spec.id, spec.reason
    );
    let decider = Decider {
        health: None,
        // An entry only ever refuses: no `allow`, `limited` or open-connection series.
        counters: metrics.rule_counters_for(&name, &[crate::metrics::DecisionKind::deny], false),
        name: Arc::from(name),
        action: Action::Deny(Refusal {
            status,
            body: Bytes::from(body),
            retry_after: (!retry_after.is_zero()).then_some(retry_after),
            jitter: spec.jitter,
        }),
        close_existing: spec.close_existing,
        drain,
    };
    Ok(Entry {
        spec,
        range,
        decider,
        scope: Scope::Local,
    })
}

/// Compiles a whole state file; every entry must be valid.
pub fn compile_state(
    state: StateFile,
    ordering: VersionOrdering,
    metrics: &Metrics,
) -> Result<KillSet, KillSwitchError> {
    if state.entries.len() > MAX_ENTRIES {
        return Err(KillSwitchError::Invalid(format!(
            "{} entries: at most {MAX_ENTRIES}",
            state.entries.len()
        )));
    }
    let entries = state
        .entries
        .into_iter()
        .map(|s| compile_entry(s, ordering, metrics))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KillSet { entries })
}

/// The backup file next to `path`.
pub fn backup_path(path: &Path) -> PathBuf {
    with_suffix(path, ".bak")
}

/// Reads and parses a state file; `Ok(None)` when it does not exist.
pub fn read_state(path: &Path) -> Result<Option<(StateFile, Vec<u8>)>, KillSwitchError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(KillSwitchError::State {
                path: path.to_path_buf(),
                message: format!("cannot read: {e}"),
            })
        }
    };
    let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| KillSwitchError::State {
        path: path.to_path_buf(),
        message: format!(
            "invalid kill-switch state at line {} column {}: {e}",
            e.line(),
            e.column()
        ),
    })?;
    Ok(Some((state, bytes)))
}

/// Permissions of the state file and its backup: read and written by fwgate's user only (the
/// entries name incidents; nothing else needs to read them). Set explicitly, whatever the
/// umask or the mode of a file that was there before.
pub const STATE_FILE_MODE: u32 = 0o600;

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The temp file a write goes through, renamed over the state file once complete.
pub fn temp_path(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

/// Removes temp files a crashed or failed write may have left (`.tmp`, `.bak.tmp`); at
/// start-up and before each write. A symlink planted at a temp name is removed, not followed.
pub fn remove_stale_temp_files(path: &Path) {
    for stale in [temp_path(path), with_suffix(&backup_path(path), ".tmp")] {
        match std::fs::remove_file(&stale) {
            Ok(()) => {
                tracing::warn!(file = %stale.display(), "removed a stale kill-switch temp file")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %stale.display(), error = %e, "cannot remove a stale kill-switch temp file")
            }
        }
    }
}

/// Writes the state atomically, keeping the previous file as `.bak`. Returns the bytes written
/// (so the watcher can recognise its own write).
///
/// The new content goes to a temp file created exclusively (`O_CREAT|O_EXCL`, never through a
/// symlink) with [`STATE_FILE_MODE`], is fsynced, and is renamed over the state file. The
/// previous file is kept by a hard link (to `.bak.tmp`, renamed over `.bak`), not a copy: no
/// byte of it is written again, so a full disk cannot truncate the backup, and its mode bits
/// (a read-only file from configuration management) do not matter. Any failure removes the
/// temp files and leaves the state file and its backup as they were.
pub fn write_state(path: &Path, state: &StateFile) -> Result<Vec<u8>, KillSwitchError> {
    let fail = |m: String| KillSwitchError::State {
        path: path.to_path_buf(),
        message: m,
    };
    let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| fail(e.to_string()))?;
    bytes.push(b'\n');
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create state_dir: {e}")))?;
    }
    remove_stale_temp_files(path);
    let result = replace_keeping_backup(path, &bytes);
    if result.is_err() {
        remove_stale_temp_files(path);
    }
    result.map_err(fail)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(bytes)
}

/// The steps of [`write_state`] that can fail half-way; the caller cleans up after them.
fn replace_keeping_backup(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = temp_path(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(STATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    // The mode given at creation is narrowed by the umask, never widened; set it exactly.
    use std::os::unix::fs::PermissionsExt as _;
    f.set_permissions(std::fs::Permissions::from_mode(STATE_FILE_MODE))
        .map_err(|e| format!("cannot set the mode of {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.sync_all()
        .map_err(|e| format!("cannot fsync {}: {e}", tmp.display()))?;
    drop(f);
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            // Keep the previous version: if the new one is ever corrupted, it is the fallback.
            let bak = backup_path(path);
            let bak_tmp = with_suffix(&bak, ".tmp");
            std::fs::hard_link(path, &bak_tmp)
                .map_err(|e| format!("cannot keep the previous file as {}: {e}", bak.display()))?;
            std::fs::rename(&bak_tmp, &bak)
                .map_err(|e| format!("cannot keep the previous file as {}: {e}", bak.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read the current file: {e}")),
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename into place: {e}"))
}

/// Loads the state at start-up: the file, else (loudly) its backup. Fails only when a file
/// exists and neither it nor the backup can be used.
pub fn load_at_startup(
    path: &Path,
    ordering: VersionOrdering,
    metrics: &Metrics,
) -> Result<(KillSet, bool), KillSwitchError> {
    remove_stale_temp_files(path);
    let primary = read_state(path).and_then(|s| match s {
        None => Ok(None),
        Some((state, _)) => compile_state(state, ordering, metrics).map(Some),
    });
    match primary {
        Ok(Some(set)) => Ok((set, false)),
        Ok(None) => Ok((KillSet::default(), false)),
        Err(primary_err) => {
            let bak = backup_path(path);
            match read_state(&bak) {
                Ok(Some((state, _))) => match compile_state(state, ordering, metrics) {
                    Ok(set) => {
                        tracing::error!(error = %primary_err, backup = %bak.display(), "kill-switch state is unusable; using the backup");
                        Ok((set, true))
                    }
                    Err(e) => Err(KillSwitchError::State {
                        path: path.to_path_buf(),
                        message: format!("unusable ({primary_err}); backup also unusable ({e}); fix or remove the file to start"),
                    }),
                },
                Ok(None) => Err(KillSwitchError::State {
                    path: path.to_path_buf(),
                    message: format!("unusable ({primary_err}) and there is no backup; fix or remove the file to start"),
                }),
                Err(e) => Err(KillSwitchError::State {
                    path: path.to_path_buf(),
                    message: format!("unusable ({primary_err}); backup unusable ({e}); fix or remove the file to start"),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(versions: &str) -> NewEntry {
        NewEntry {
            versions: versions.into(),
            reason: "incident 42".into(),
            id: Some("ks-1".into()),
            ttl: None,
            expires_at: None,
            status: None,
            retry_after: None,
            jitter: None,
            close_existing: None,
            drain: None,
        }
    }

    fn parsed(v: &str) -> VersionInput {
        VersionInput::Parsed(FirmwareVersion::parse(v).unwrap())
    }

    #[test]
    fn a_bare_partial_version_is_refused_with_both_readings() {
        for (written, exact, example, line) in [
            ("3.6", "3.6.0", "3.6.5", "3.6.*"),
            ("v3", "3.0.0", "3.1.0", "3.*"),
            (">=2.0.0, 3.6 || 4.0.0", "3.6.0", "3.6.5", "3.6.*"),
        ] {
            let e = spec_from_request(req(written), VersionOrdering::Firmware, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("means exactly {exact}")), "{e}");
            assert!(
                e.contains(&format!("so {example} would still connect")),
                "{e}"
            );
            assert!(e.contains(&format!("write {line:?}")), "{e}");
            assert!(e.contains(&format!("\"={exact}\"")), "{e}");
        }
        for fine in ["3.6.*", "=3.6.0", "3.6.0", "=3.6", ">=3.6", "*"] {
            assert!(
                spec_from_request(req(fine), VersionOrdering::Firmware, None).is_ok(),
                "{fine}"
            );
        }
    }

    #[test]
    fn defaults_spread_reconnects() {
        let spec = spec_from_request(req(">=3.8.0-b3"), VersionOrdering::Firmware, None).unwrap();
        assert_eq!(spec.status, 503);
        assert_eq!(spec.retry_after, "5m");
        assert_eq!(spec.jitter, 0.5);
        assert!(spec.close_existing);
        assert_eq!(spec.drain, "10s");
    }

    #[test]
    fn requests_are_validated_with_clear_messages() {
        let mut r = req(">=3.8.0-b3");
        r.reason = " ".into();
        assert!(spec_from_request(r, VersionOrdering::Firmware, None)
            .unwrap_err()
            .to_string()
            .contains("reason is required"));
        let e = spec_from_request(req(">=3.8,"), VersionOrdering::Firmware, None).unwrap_err();
        assert!(e.to_string().contains("versions \">=3.8,\""), "{e}");
        let mut r = req("*");
        r.status = Some(200);
        assert!(spec_from_request(r, VersionOrdering::Firmware, None).is_err());
        let mut r = req("*");
        r.ttl = Some("2".into());
        assert!(spec_from_request(r, VersionOrdering::Firmware, None)
            .unwrap_err()
            .to_string()
            .contains("ttl"));
        let mut r = req("*");
        r.reason = "x".repeat(MAX_REASON_BYTES);
        assert!(spec_from_request(r, VersionOrdering::Firmware, None).is_ok());
        let mut r = req("*");
        r.reason = "x".repeat(MAX_REASON_BYTES + 1);
        let e = spec_from_request(r, VersionOrdering::Firmware, None).unwrap_err();
        assert!(e.to_string().contains("at most 1024"), "{e}");
        let mut r = req("*");
        r.id = Some("bad id!".into());
        assert!(spec_from_request(r, VersionOrdering::Firmware, None).is_err());
    }

    #[test]
    fn maintenance_mode_refuses_everything_and_ranges_only_versions() {
        let m = Metrics::new();
        let all = compile_entry(
            spec_from_request(req("*"), VersionOrdering::Firmware, None).unwrap(),
            VersionOrdering::Firmware,
            &m,
        )
        .unwrap();
        assert!(all.matches(&VersionInput::Missing));
        assert!(all.matches(&VersionInput::Unparseable));
        assert!(all.matches(&parsed("0.0.1")));
        let some = compile_entry(
            spec_from_request(req(">=3.8.0-b3"), VersionOrdering::Firmware, None).unwrap(),
            VersionOrdering::Firmware,
            &m,
        )
        .unwrap();
        assert!(!some.matches(&VersionInput::Missing));
        assert!(some.matches(&parsed("3.9.0-b1")));
        assert!(!some.matches(&parsed("3.8.0-b2")));
    }

    #[test]
    fn expired_entries_stop_applying() {
        let m = Metrics::new();
        let mut spec = spec_from_request(req("*"), VersionOrdering::Firmware, None).unwrap();
        spec.expires_at = Some(unix_now() - 1);
        let set = KillSet {
            entries: vec![compile_entry(spec, VersionOrdering::Firmware, &m).unwrap()],
        };
        assert!(set.find(&parsed("1.0.0")).is_none());
    }

    #[test]
    fn state_round_trips_with_backup_and_falls_back_when_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let m = Metrics::new();
        let a = spec_from_request(req(">=3.8"), VersionOrdering::Firmware, None).unwrap();
        write_state(
            &path,
            &StateFile {
                version: 1,
                entries: vec![a.clone()],
            },
        )
        .unwrap();
        assert!(!backup_path(&path).exists());
        let mut b = a.clone();
        b.id = "ks-2".into();
        write_state(
            &path,
            &StateFile {
                version: 1,
                entries: vec![a.clone(), b],
            },
        )
        .unwrap();
        let (set, fell_back) = load_at_startup(&path, VersionOrdering::Firmware, &m).unwrap();
        assert_eq!((set.entries.len(), fell_back), (2, false));
        std::fs::write(&path, b"{ not json").unwrap();
        let (set, fell_back) = load_at_startup(&path, VersionOrdering::Firmware, &m).unwrap();
        assert_eq!((set.entries.len(), fell_back), (1, true));
        std::fs::write(backup_path(&path), b"garbage").unwrap();
        let e = load_at_startup(&path, VersionOrdering::Firmware, &m)
            .unwrap_err()
            .to_string();
        assert!(e.contains("killswitch.json"), "{e}");
    }

    #[test]
    fn missing_file_is_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        let (set, _) = load_at_startup(
            &dir.path().join(STATE_FILE),
            VersionOrdering::Firmware,
            &Metrics::new(),
        )
        .unwrap();
        assert!(set.entries.is_empty());
    }
}
