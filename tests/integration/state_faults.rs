//! The kill-switch state file under real faults: a full filesystem (a small tmpfs), a
//! read-only state file, a symlink planted at the temp name. Each write either lands whole or
//! leaves the file and its backup as they were, with no temp file behind.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use fwgate::killswitch::{
    backup_path, load_at_startup, read_state, temp_path, write_state, EntrySpec, StateFile,
    STATE_FILE, STATE_FILE_MODE,
};
use fwgate::metrics::Metrics;
use fwgate::version::VersionOrdering;

fn state(entries: usize, reason_len: usize) -> StateFile {
    StateFile {
        version: 1,
        entries: (0..entries)
            .map(|i| EntrySpec {
                id: format!("ks-{i}"),
                versions: format!(">={i}.0.0"),
                reason: "r".repeat(reason_len),
                created_at: 1,
                expires_at: None,
                status: 503,
                retry_after: "5m".into(),
                jitter: 0.5,
                close_existing: true,
                drain: "10s".into(),
                created_by: None,
            })
            .collect(),
    }
}

/// How many entries the state at `path` has; panics (with the content) if it is not valid.
fn entries_in(path: &Path) -> usize {
    match read_state(path) {
        Ok(Some((s, _))) => s.entries.len(),
        other => panic!(
            "{} is not a valid state file ({:?}): {:?}",
            path.display(),
            other.err(),
            std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned())
        ),
    }
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A tmpfs of `kib` KiB mounted on a fresh directory, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// None (with a loud note) when this process cannot mount (not root, or no mount(8)).
    fn mount(kib: u32) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs { dir }),
            other => {
                eprintln!(
                    "SKIPPED: the full-filesystem test needs to mount a small tmpfs (root and mount(8)); mount said: {other:?}"
                );
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem of `dir` to the last byte, then frees `free_kib` KiB again.
fn fill_leaving(dir: &Path, free_kib: u64) -> PathBuf {
    use std::io::Write as _;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![b'x'; 4096];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(free_kib * 1024)).unwrap();
    f.sync_all().unwrap();
    filler
}

#[test]
fn a_full_filesystem_never_truncates_the_backup_nor_leaves_a_temp_file() {
    let Some(fs) = SmallFs::mount(256) else {
        return;
    };
    let path = fs.path().join(STATE_FILE);
    // One tmpfs page, then three (about 10 KiB).
    write_state(&path, &state(1, 10)).unwrap();
    write_state(&path, &state(10, 1000)).unwrap();
    assert_eq!(
        (entries_in(&path), entries_in(&backup_path(&path))),
        (10, 1)
    );

    // Three pages free: room for the new file (two pages), not for a copy of the current one
    // (three): keeping the previous file must not need its bytes written again (a copy would
    // truncate the backup and fail half-way).
    let filler = fill_leaving(fs.path(), 12);
    write_state(&path, &state(6, 1000)).expect("the new file fits; the backup costs no space");
    assert_eq!(
        (entries_in(&path), entries_in(&backup_path(&path))),
        (6, 10)
    );

    // Full to the last byte: the write fails, says so, and changes nothing.
    let filler_len = std::fs::metadata(&filler).unwrap().len();
    drop(fill_leaving(fs.path(), 0));
    assert!(std::fs::metadata(&filler).unwrap().len() >= filler_len);
    let err = write_state(&path, &state(60, 1000))
        .expect_err("a write to a full filesystem must fail")
        .to_string();
    assert!(err.contains("killswitch.json"), "{err}");
    assert_eq!(
        (entries_in(&path), entries_in(&backup_path(&path))),
        (6, 10)
    );
    assert_eq!(
        names_in(fs.path()),
        ["filler", "killswitch.json", "killswitch.json.bak"],
        "a temp file was left behind"
    );

    // Space again: the next write works.
    std::fs::remove_file(&filler).unwrap();
    write_state(&path, &state(2, 10)).unwrap();
    assert_eq!((entries_in(&path), entries_in(&backup_path(&path))), (2, 6));
}

#[test]
fn a_read_only_state_file_does_not_make_later_writes_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, serde_json::to_vec(&state(1, 5)).unwrap()).unwrap();
    // As configuration management may leave it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let previous_inode = std::fs::metadata(&path).unwrap().ino();
    for n in 2..5 {
        write_state(&path, &state(n, 5)).unwrap_or_else(|e| panic!("write {n}: {e}"));
        assert_eq!(entries_in(&path), n);
        assert_eq!(entries_in(&backup_path(&path)), n - 1);
    }
    // The backup is the previous file itself (a link), not a copy made with its mode bits...
    write_state(&path, &state(1, 5)).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    let current_inode = meta.ino();
    write_state(&path, &state(2, 5)).unwrap();
    assert_eq!(
        std::fs::metadata(backup_path(&path)).unwrap().ino(),
        current_inode
    );
    assert_ne!(current_inode, previous_inode);
    // ...and each new file gets the documented mode, whatever the umask or the old file's.
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        STATE_FILE_MODE
    );
}

#[test]
fn a_symlink_planted_at_the_temp_name_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, temp_path(&path)).unwrap();
    write_state(&path, &state(1, 5)).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the state file must be a plain file"
    );
    assert_eq!(entries_in(&path), 1);
    assert!(std::fs::symlink_metadata(temp_path(&path)).is_err());

    // Planted again, and left from a crash: start-up removes it without following it.
    std::os::unix::fs::symlink(&victim, temp_path(&path)).unwrap();
    let (set, fell_back) =
        load_at_startup(&path, VersionOrdering::Firmware, &Metrics::new()).unwrap();
    assert_eq!((set.entries.len(), fell_back), (1, false));
    assert!(std::fs::symlink_metadata(temp_path(&path)).is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}
