//! Certificate rotation without a restart: the serving certificate behind an atomic pointer
//! ([`ReloadingCert`]) and the watcher that swaps it when its files change.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::sync::Notify;

use super::certs::{certified_key_from_pem, read_file};
use super::identity::client_cert_identity;
use super::{TlsError, TlsFiles};

/// How long the certificate directory must be quiet after a change before the files are
/// re-read, so that a rotation writing several files is picked up as one change.
pub const CERT_RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

/// Upper bound on the debounce, so a directory that never stops changing still gets re-read.
const CERT_RELOAD_MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// Period of the re-check that runs even without file events, for events the watcher missed
/// (for example when the watched directory itself was replaced).
pub const CERT_RECHECK_INTERVAL: Duration = Duration::from_secs(60);

/// The serving certificate, swappable atomically: handshakes in progress keep the key they
/// started with, new handshakes use whatever was last passed to [`ReloadingCert::replace`].
/// This is what makes certificate rotation work without a restart.
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ReloadingCert {
    /// Creates the resolver serving `key` (from [`super::load_certified_key`]).
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::new(key),
        })
    }

    /// Serves `key` to all handshakes that start from now on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }

    /// The certificate and key currently served (for logs, metrics and tests).
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        f.debug_struct("ReloadingCert")
            .field(
                "subject",
                &current
                    .end_entity_cert()
                    .ok()
                    .and_then(client_cert_identity),
            )
            .field("chain_len", &current.cert.len())
            .finish()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Keeps the certificate files watched; dropping it stops the watching (the file watcher and
/// its task). Also counts reloads, for metrics.
pub struct CertWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<WatchStats>,
}

#[derive(Debug, Default)]
struct WatchStats {
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl CertWatcher {
    /// How many times a new certificate was loaded and put in service.
    pub fn reloads(&self) -> u64 {
        self.stats.reloads.load(Ordering::Relaxed)
    }

    /// How many times the files changed but could not be loaded (the old certificate was kept).
    pub fn failed_reloads(&self) -> u64 {
        self.stats.failures.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for CertWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertWatcher")
            .field("reloads", &self.reloads())
            .field("failed_reloads", &self.failed_reloads())
            .finish_non_exhaustive()
    }
}

impl Drop for CertWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches the certificate and key files and puts a changed, valid pair in service through
/// `resolver.replace`, so that rotation needs no restart.
///
/// The parent directories are watched (not the files: a watch on a file dies with the first
/// rename or Kubernetes `..data` swap), events are not filtered by file name (a Secret swap
/// names `..data`, not `tls.crt`), paths are never canonicalized. After an event the directory
/// must be quiet for [`CERT_RELOAD_DEBOUNCE`]; then both files are re-read, and if their
/// contents changed and they load, the new certificate is served. A pair that fails to load
/// (for example a half-written rotation) is logged with `tracing::error` and the old
/// certificate stays. The files are also re-checked every [`CERT_RECHECK_INTERVAL`] in case an
/// event was missed. Must be called inside a tokio runtime.
pub fn watch_cert_files(
    files: TlsFiles,
    resolver: Arc<ReloadingCert>,
) -> Result<CertWatcher, TlsError> {
    watch_tls_files(files, resolver, None)
}

/// The server configuration in force, swapped whole when the client CA file changes (the
/// serving certificate changes inside it, through its [`ReloadingCert`]).
pub type SharedServerConfig = Arc<ArcSwap<ServerConfig>>;

/// [`watch_cert_files`], and with `server` the client CA file too: when its content changes
/// and the new configuration builds, it is put in service for new handshakes (a CA that does
/// not load is logged and the previous one stays), as the certificate is.
pub fn watch_tls_files(
    files: TlsFiles,
    resolver: Arc<ReloadingCert>,
    server: Option<SharedServerConfig>,
) -> Result<CertWatcher, TlsError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| TlsError::NoRuntime)?;
    let wake = Arc::new(Notify::new());
    let wake_on_event = Arc::clone(&wake);
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if is_change(&event.kind) => wake_on_event.notify_one(),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "certificate directory watch error"),
        })
        .map_err(TlsError::WatcherInit)?;
    for dir in watched_dirs(&files) {
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| TlsError::Watch {
                dir: dir.clone(),
                source,
            })?;
    }
    let stats = Arc::new(WatchStats::default());
    let task = runtime.spawn(watch_loop(
        files,
        resolver,
        server,
        wake,
        Arc::clone(&stats),
    ));
    Ok(CertWatcher {
        _watcher: watcher,
        task,
        stats,
    })
}

/// Whether an event can mean changed content. Opening or reading a file cannot (and our own
/// re-reads would otherwise wake the watcher again); a write being closed can.
pub(super) fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The distinct parent directories of the cert and key paths, as configured.
pub(super) fn watched_dirs(files: &TlsFiles) -> BTreeSet<PathBuf> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    })
    .collect()
}

/// Cert and key file contents as last put in service.
type Contents = (Vec<u8>, Vec<u8>);

/// The watcher task: check at once (closing the gap between the caller's initial load and the
/// watch being set up), then after every debounced change or recheck period.
async fn watch_loop(
    files: TlsFiles,
    resolver: Arc<ReloadingCert>,
    server: Option<SharedServerConfig>,
    wake: Arc<Notify>,
    stats: Arc<WatchStats>,
) {
    let mut served: Option<Contents> = None;
    let mut served_ca: Option<Vec<u8>> = None;
    loop {
        served = check_files(&files, &resolver, served, &stats).await;
        if let Some(server) = &server {
            served_ca = check_client_ca(&files, &resolver, server, served_ca, &stats).await;
        }
        tokio::select! {
            () = wake.notified() => debounce(&wake).await,
            () = tokio::time::sleep(CERT_RECHECK_INTERVAL) => {}
        }
    }
}

/// Re-reads the client CA file; if it differs from `served` and a server configuration builds
/// with it, puts that configuration in service. Returns the CA content now in service.
async fn check_client_ca(
    files: &TlsFiles,
    resolver: &Arc<ReloadingCert>,
    server: &SharedServerConfig,
    served: Option<Vec<u8>>,
    stats: &WatchStats,
) -> Option<Vec<u8>> {
    let path = files.client_ca.clone()?;
    let blocking_files = files.clone();
    let blocking_resolver = resolver.clone();
    let previous = served.clone();
    let built = tokio::task::spawn_blocking(move || {
        let content = read_file(&path)?;
        if previous.as_ref() == Some(&content) {
            return Ok((content, None));
        }
        let config = super::server::server_config(&blocking_files, blocking_resolver)?;
        Ok::<_, TlsError>((content, Some(config)))
    })
    .await;
    match built {
        Ok(Ok((content, None))) => Some(content),
        Ok(Ok((content, Some(config)))) => {
            server.store(config);
            if served.is_some() {
                stats.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client_ca = %files.client_ca.as_deref().map(|p| p.display().to_string()).unwrap_or_default(), "client CA reloaded; new handshakes verify device certificates against it");
            }
            Some(content)
        }
        Ok(Err(error)) => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "client CA reload failed; keeping the current one");
            served
        }
        Err(error) => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "client CA reload task failed; keeping the current one");
            served
        }
    }
}

/// Waits until no change has been signalled for [`CERT_RELOAD_DEBOUNCE`], or at most
/// [`CERT_RELOAD_MAX_DEBOUNCE`].
async fn debounce(wake: &Notify) {
    let deadline = tokio::time::Instant::now() + CERT_RELOAD_MAX_DEBOUNCE;
    loop {
        tokio::select! {
            () = wake.notified() => {
                if tokio::time::Instant::now() >= deadline {
                    return;
                }
            }
            () = tokio::time::sleep(CERT_RELOAD_DEBOUNCE) => return,
        }
    }
}

/// Outcome of reading the files off the async threads.
enum Check {
    Unchanged(Contents),
    Loaded(Contents, CertifiedKey),
    Failed(TlsError),
}

/// Re-reads both files; if they differ from `served` and load, serves the new certificate.
/// Returns the contents now in service.
async fn check_files(
    files: &TlsFiles,
    resolver: &ReloadingCert,
    served: Option<Contents>,
    stats: &WatchStats,
) -> Option<Contents> {
    let blocking_files = files.clone();
    let previous = served.clone();
    let check = tokio::task::spawn_blocking(move || {
        let contents = match (
            read_file(&blocking_files.cert),
            read_file(&blocking_files.key),
        ) {
            (Ok(cert), Ok(key)) => (cert, key),
            (Err(e), _) | (_, Err(e)) => return Check::Failed(e),
        };
        if previous.as_ref() == Some(&contents) {
            return Check::Unchanged(contents);
        }
        match certified_key_from_pem(&blocking_files, &contents.0, &contents.1) {
            Ok(key) => Check::Loaded(contents, key),
            Err(e) => Check::Failed(e),
        }
    })
    .await;
    match check {
        Ok(Check::Unchanged(contents)) => Some(contents),
        Ok(Check::Loaded(contents, key)) => {
            if key.cert != resolver.current().cert {
                let subject = key.end_entity_cert().ok().and_then(client_cert_identity);
                resolver.replace(Arc::new(key));
                stats.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    cert = %files.cert.display(),
                    subject = subject.as_deref().unwrap_or("-"),
                    "TLS certificate reloaded; new handshakes use it"
                );
            }
            Some(contents)
        }
        Ok(Check::Failed(error)) => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "TLS certificate reload failed; keeping the current certificate");
            served
        }
        Err(error) => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "TLS certificate reload task failed; keeping the current certificate");
            served
        }
    }
}
