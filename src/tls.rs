//! TLS for fwgate: loading and checking certificate files, the server configuration (TLS 1.2
//! and 1.3, ALPN `h2`/`http/1.1`, optional client certificates), hot rotation of the serving
//! certificate, the device identity carried by a client certificate, and the client
//! configuration for TLS to the backend.
//!
//! fwgate terminates TLS at the edge, in front of whole fleets, so this module is built so that
//! a certificate problem never takes the proxy down:
//!
//! * files are validated up front with messages that name the file and what is wrong
//!   ([`load_certified_key`], used by `fwgate check` and at start-up), including a key that does
//!   not belong to the certificate;
//! * the serving certificate sits behind an atomic pointer ([`ReloadingCert`]); a watcher
//!   ([`watch_cert_files`]) swaps it when the files change, so new handshakes use the rotated
//!   certificate without a restart, and a broken rotation is logged and keeps the old one;
//! * every configuration is built with the `ring` provider explicitly, never with a
//!   process-wide default provider, so nothing depends on `install_default` having been called.
//!
//! The module is self-contained (it uses no other fwgate module) so that it can be compiled and
//! tested on its own.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::Notify;

/// ALPN protocols the server offers, in preference order: HTTP/2 for plain requests, HTTP/1.1
/// for everything else (WebSocket upgrades need HTTP/1.1).
pub const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// ALPN protocol offered to the backend: the forwarding client speaks HTTP/1.1 only.
pub const UPSTREAM_ALPN: &[u8] = b"http/1.1";

/// How long the certificate directory must be quiet after a change before the files are
/// re-read, so that a rotation writing several files is picked up as one change.
pub const CERT_RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

/// Upper bound on the debounce, so a directory that never stops changing still gets re-read.
const CERT_RELOAD_MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// Period of the re-check that runs even without file events, for events the watcher missed
/// (for example when the watched directory itself was replaced).
pub const CERT_RECHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Longest device identity [`client_cert_identity`] returns; longer names are not used.
const MAX_IDENTITY_LEN: usize = 255;

/// The TLS files of a listener, as configured (paths are used as given, never canonicalized,
/// so that Kubernetes Secret mounts keep working across their `..data` symlink swaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file with the certificate chain, end-entity certificate first.
    pub cert: PathBuf,
    /// PEM file with the private key of the end-entity certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM file with the CA certificates that client certificates are verified against;
    /// `None` means client certificates are not requested.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca` set: `true` refuses clients without a valid certificate, `false`
    /// accepts them but still verifies a certificate that is presented.
    pub require_client_cert: bool,
}

/// Why TLS files or a TLS configuration could not be used. Every message names the file and
/// what is wrong with it, because operators read these in `fwgate check` and start-up logs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read (missing, permissions, ...).
    #[error("{}: cannot read: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("{}: invalid PEM: {source}", .path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM decoding error.
        source: pem::Error,
    },
    /// The certificate file holds no `CERTIFICATE` section.
    #[error("{}: no certificate found", .path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The certificate is not a parseable X.509 certificate.
    #[error("{}: invalid certificate: {source}", .path.display())]
    InvalidCertificate {
        /// The file.
        path: PathBuf,
        /// What rustls/webpki found wrong.
        source: rustls::Error,
    },
    /// The key file holds no private key in a supported PEM section.
    #[error("{}: no private key (PKCS#8, PKCS#1 or SEC1) found", .path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds only an encrypted private key, which fwgate cannot use.
    #[error("{}: the private key is encrypted; provide an unencrypted PKCS#8, PKCS#1 or SEC1 key", .path.display())]
    EncryptedPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key was found but the crypto provider cannot use it.
    #[error("{}: unsupported private key: {source}", .path.display())]
    UnsupportedPrivateKey {
        /// The file.
        path: PathBuf,
        /// The provider's error.
        source: rustls::Error,
    },
    /// The private key does not belong to the end-entity certificate.
    #[error("{} does not match {}", .key.display(), .cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The CA file holds no `CERTIFICATE` section.
    #[error("{}: no CA certificate found", .path.display())]
    NoCaCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate cannot be used as a trust anchor.
    #[error("{}: invalid CA certificate: {source}", .path.display())]
    InvalidCaCertificate {
        /// The file.
        path: PathBuf,
        /// What rustls/webpki found wrong.
        source: rustls::Error,
    },
    /// `require_client_cert` is set but there is no CA to verify client certificates against.
    #[error("require_client_cert is set but no client_ca file is configured")]
    ClientCertWithoutCa,
    /// The client-certificate verifier could not be built from the CA file.
    #[error("{}: cannot build the client certificate verifier: {source}", .path.display())]
    ClientVerifier {
        /// The CA file.
        path: PathBuf,
        /// The builder's error.
        source: rustls::server::VerifierBuilderError,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The backend name is not a valid TLS server name (DNS name or IP address).
    #[error("invalid TLS server name {name:?}: {source}")]
    InvalidServerName {
        /// The name as configured.
        name: String,
        /// Why it is invalid.
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// The file watcher could not be created.
    #[error("cannot create the certificate file watcher: {0}")]
    WatcherInit(#[source] notify::Error),
    /// A certificate directory could not be watched.
    #[error("{}: cannot watch directory: {source}", .dir.display())]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// The watcher's error.
        source: notify::Error,
    },
    /// [`watch_cert_files`] was called outside a tokio runtime.
    #[error("the certificate watcher needs a tokio runtime")]
    NoRuntime,
}

/// The crypto provider every configuration in this module uses: `ring`, chosen explicitly so
/// that nothing depends on a process-default provider being installed.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and validates the certificate chain and private key (and, when configured, the client
/// CA file), checking that the key belongs to the end-entity certificate. Used by `fwgate check`
/// and at start-up, so that a bad file is reported before anything listens.
pub fn load_certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_pem = read_file(&files.cert)?;
    let key_pem = read_file(&files.key)?;
    let certified = certified_key_from_pem(files, &cert_pem, &key_pem)?;
    match &files.client_ca {
        Some(ca) => {
            load_roots(ca)?;
        }
        None if files.require_client_cert => return Err(TlsError::ClientCertWithoutCa),
        None => {}
    }
    Ok(Arc::new(certified))
}

/// Reads a whole file, naming it in the error.
fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses every `CERTIFICATE` section of a PEM file; other sections are ignored.
fn parse_certs(path: &Path, pem_bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })
}

/// Builds a [`CertifiedKey`] from the PEM contents of the cert and key files and checks that
/// the key matches the end-entity certificate.
fn certified_key_from_pem(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = parse_certs(&files.cert, cert_pem)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(
                if contains(key_pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") {
                    TlsError::EncryptedPrivateKey {
                        path: files.key.clone(),
                    }
                } else {
                    TlsError::NoPrivateKey {
                        path: files.key.clone(),
                    }
                },
            );
        }
        Err(source) => {
            return Err(TlsError::Pem {
                path: files.key.clone(),
                source,
            })
        }
    };
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|source| {
        TlsError::UnsupportedPrivateKey {
            path: files.key.clone(),
            source,
        }
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                key: files.key.clone(),
                cert: files.cert.clone(),
            })
        }
        Err(rustls::Error::InconsistentKeys(_)) => {
            // The provider cannot export this key's public half; rustls itself accepts such
            // keys (`CertifiedKey::from_der`), so do the same but say so.
            tracing::warn!(
                key = %files.key.display(),
                cert = %files.cert.display(),
                "cannot check that the private key matches the certificate"
            );
            Ok(certified)
        }
        Err(source) => Err(TlsError::InvalidCertificate {
            path: files.cert.clone(),
            source,
        }),
    }
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Loads the CA certificates of a PEM file as trust anchors; every certificate must be usable,
/// so a typo in a CA bundle is reported instead of silently narrowing who is trusted.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let certs = parse_certs(path, &read_file(path)?)?;
    if certs.is_empty() {
        return Err(TlsError::NoCaCertificate {
            path: path.to_path_buf(),
        });
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|source| TlsError::InvalidCaCertificate {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(roots)
}

/// The serving certificate, swappable atomically: handshakes in progress keep the key they
/// started with, new handshakes use whatever was last passed to [`ReloadingCert::replace`].
/// This is what makes certificate rotation work without a restart.
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ReloadingCert {
    /// Creates the resolver serving `key` (from [`load_certified_key`]).
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

/// Builds the server configuration: TLS 1.2 and 1.3 with the `ring` provider, ALPN `h2` then
/// `http/1.1`, the serving certificate from `resolver`, and, when `files.client_ca` is set,
/// client certificates verified against that CA (required or "verified if presented",
/// according to `files.require_client_cert`). The client CA is read here, once: changing it
/// needs a restart (only the serving certificate is hot-reloaded).
pub fn server_config(
    files: &TlsFiles,
    resolver: Arc<ReloadingCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            if !files.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None if files.require_client_cert => return Err(TlsError::ClientCertWithoutCa),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Builds the client configuration for TLS to the backend: TLS 1.2 and 1.3 with the `ring`
/// provider, trusting only the CA certificates in `ca_file` (no system roots: the backend is
/// ours, and a private CA must not be widened to the whole web PKI), ALPN `http/1.1`, no client
/// certificate. The SNI name is given per connection to `TlsConnector::connect`; see
/// [`upstream_server_name`].
pub fn upstream_client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(ca_file)?;
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![UPSTREAM_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Parses the configured backend TLS name (DNS name or IP address) once, so that a bad name is
/// a configuration error reported by `fwgate check` rather than a failure on every connection.
pub fn upstream_server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|source| TlsError::InvalidServerName {
        name: name.to_owned(),
        source,
    })
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
    let task = runtime.spawn(watch_loop(files, resolver, wake, Arc::clone(&stats)));
    Ok(CertWatcher {
        _watcher: watcher,
        task,
        stats,
    })
}

/// Whether an event can mean changed content. Opening or reading a file cannot (and our own
/// re-reads would otherwise wake the watcher again); a write being closed can.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The distinct parent directories of the cert and key paths, as configured.
fn watched_dirs(files: &TlsFiles) -> BTreeSet<PathBuf> {
    [&files.cert, &files.key]
        .into_iter()
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
    wake: Arc<Notify>,
    stats: Arc<WatchStats>,
) {
    let mut served: Option<Contents> = None;
    loop {
        served = check_files(&files, &resolver, served, &stats).await;
        tokio::select! {
            () = wake.notified() => debounce(&wake).await,
            () = tokio::time::sleep(CERT_RECHECK_INTERVAL) => {}
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

/// The device identity in a client certificate: the subject Common Name, else the first DNS
/// subjectAltName, else `None`. This is how a device authenticated by its certificate is named
/// in logs and decisions without trusting anything it sends later.
///
/// Call it only on a certificate rustls has verified (`peer_certificates()[0]` after the
/// handshake). The DER is walked by a small bounded reader that never panics; anything
/// unexpected yields `None`. A name that is empty, longer than 255 bytes, or contains control
/// characters is not used.
pub fn client_cert_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (subject, extensions) = x509::subject_and_extensions(cert.as_ref())?;
    x509::common_name(subject)
        .filter(|s| acceptable_identity(s))
        .or_else(|| {
            extensions
                .and_then(x509::first_dns_san)
                .filter(|s| acceptable_identity(s))
        })
}

/// Whether a name from a certificate is fit to be logged and matched as a device id.
fn acceptable_identity(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_IDENTITY_LEN && !s.chars().any(char::is_control)
}

/// Just enough DER/X.509 to find the subject CN and the DNS subjectAltNames. Every read is
/// bounds-checked and every loop consumes input, so the work is linear in the input size.
mod x509 {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const INTEGER: u8 = 0x02;
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const VERSION: u8 = 0xa0; // [0] EXPLICIT
    const EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT
    const DNS_NAME: u8 = 0x82; // GeneralName [2] IMPLICIT IA5String

    const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17

    /// A cursor over a sequence of DER TLVs.
    struct Reader<'a> {
        rest: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn new(rest: &'a [u8]) -> Self {
            Self { rest }
        }

        /// Reads one TLV: its (single-byte) tag and its contents.
        fn next(&mut self) -> Option<(u8, &'a [u8])> {
            let (&tag, rest) = self.rest.split_first()?;
            if tag & 0x1f == 0x1f {
                return None; // high tag numbers do not occur in certificates
            }
            let (&first, mut rest) = rest.split_first()?;
            let len = if first < 0x80 {
                usize::from(first)
            } else {
                let n = usize::from(first & 0x7f);
                if n == 0 || n > 4 {
                    return None; // indefinite length (not DER) or absurdly long
                }
                let (bytes, after) = rest.split_at_checked(n)?;
                rest = after;
                let len = bytes.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
                usize::try_from(len).ok()?
            };
            let (contents, after) = rest.split_at_checked(len)?;
            self.rest = after;
            Some((tag, contents))
        }

        /// Reads one TLV that must have tag `tag`.
        fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
            let (found, contents) = self.next()?;
            (found == tag).then_some(contents)
        }
    }

    /// The subject Name and the extensions (contents of `[3]`) of a certificate.
    pub(super) fn subject_and_extensions(der: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
        let certificate = Reader::new(der).expect(SEQUENCE)?;
        let tbs = Reader::new(certificate).expect(SEQUENCE)?;
        let mut fields = Reader::new(tbs);
        let (mut tag, _) = fields.next()?;
        if tag == VERSION {
            (tag, _) = fields.next()?;
        }
        if tag != INTEGER {
            return None; // serialNumber
        }
        fields.expect(SEQUENCE)?; // signature
        fields.expect(SEQUENCE)?; // issuer
        fields.expect(SEQUENCE)?; // validity
        let subject = fields.expect(SEQUENCE)?;
        fields.expect(SEQUENCE)?; // subjectPublicKeyInfo
        let mut extensions = None;
        while let Some((tag, contents)) = fields.next() {
            if tag == EXTENSIONS {
                extensions = Some(contents);
                break;
            }
        }
        Some((subject, extensions))
    }

    /// The value of the first Common Name attribute of a Name.
    pub(super) fn common_name(name: &[u8]) -> Option<String> {
        let mut rdns = Reader::new(name);
        while let Some((tag, rdn)) = rdns.next() {
            if tag != SET {
                return None;
            }
            let mut attributes = Reader::new(rdn);
            while let Some((tag, attribute)) = attributes.next() {
                if tag != SEQUENCE {
                    return None;
                }
                let mut attribute = Reader::new(attribute);
                if attribute.expect(OID)? == OID_COMMON_NAME {
                    let (tag, value) = attribute.next()?;
                    return directory_string(tag, value);
                }
            }
        }
        None
    }

    /// The first dNSName of the subjectAltName extension, given the contents of `[3]`.
    pub(super) fn first_dns_san(extensions: &[u8]) -> Option<String> {
        let list = Reader::new(extensions).expect(SEQUENCE)?;
        let mut list = Reader::new(list);
        while let Some((tag, extension)) = list.next() {
            if tag != SEQUENCE {
                return None;
            }
            let mut extension = Reader::new(extension);
            if extension.expect(OID)? != OID_SUBJECT_ALT_NAME {
                continue;
            }
            let (mut tag, mut value) = extension.next()?;
            if tag == BOOLEAN {
                (tag, value) = extension.next()?; // critical
            }
            if tag != OCTET_STRING {
                return None;
            }
            let names = Reader::new(value).expect(SEQUENCE)?;
            let mut names = Reader::new(names);
            while let Some((tag, name)) = names.next() {
                if tag == DNS_NAME {
                    return ascii(name);
                }
            }
            return None;
        }
        None
    }

    /// Decodes an X.520 DirectoryString (and IA5String, which some CAs use for CN).
    fn directory_string(tag: u8, value: &[u8]) -> Option<String> {
        match tag {
            0x0c => std::str::from_utf8(value).ok().map(str::to_owned), // UTF8String
            0x13 | 0x14 | 0x16 => ascii(value), // PrintableString, TeletexString, IA5String
            0x1e => {
                // BMPString: UTF-16BE
                if value.len() % 2 != 0 {
                    return None;
                }
                let units = value
                    .chunks_exact(2)
                    .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
                char::decode_utf16(units)
                    .collect::<Result<String, _>>()
                    .ok()
            }
            0x1c => {
                // UniversalString: UTF-32BE
                if value.len() % 4 != 0 {
                    return None;
                }
                value
                    .chunks_exact(4)
                    .map(|q| char::from_u32(u32::from_be_bytes([q[0], q[1], q[2], q[3]])))
                    .collect()
            }
            _ => None,
        }
    }

    fn ascii(value: &[u8]) -> Option<String> {
        value
            .is_ascii()
            .then(|| String::from_utf8_lossy(value).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    };
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use std::io;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const DEADLINE: Duration = Duration::from_secs(10);

    /// A test CA that signs leaf certificates.
    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    /// A generated leaf certificate and its key.
    struct Leaf {
        cert_pem: String,
        key_pem: String,
        der: CertificateDer<'static>,
        key_der: Vec<u8>,
    }

    impl Ca {
        fn new(name: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).unwrap();
            Self {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A leaf with the given CN (none if `None`) and SANs.
        fn leaf(&self, cn: Option<&str>, sans: &[&str]) -> Leaf {
            let key = KeyPair::generate().unwrap();
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name = DistinguishedName::new();
            if let Some(cn) = cn {
                params.distinguished_name.push(DnType::CommonName, cn);
            }
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            Leaf {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                der: cert.der().clone(),
                key_der: key.serialize_der(),
            }
        }
    }

    /// A temp dir holding a CA, a server cert for localhost and a device client cert.
    struct Pki {
        dir: tempfile::TempDir,
        ca: Ca,
        server: Leaf,
        device: Leaf,
        files: TlsFiles,
    }

    impl Pki {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::new("fwgate test CA");
            let server = ca.leaf(Some("server-1"), &["localhost", "127.0.0.1"]);
            let device = ca.leaf(Some("device-42"), &[]);
            let files = TlsFiles {
                cert: dir.path().join("cert.pem"),
                key: dir.path().join("key.pem"),
                client_ca: None,
                require_client_cert: false,
            };
            std::fs::write(&files.cert, &server.cert_pem).unwrap();
            std::fs::write(&files.key, &server.key_pem).unwrap();
            std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
            Self {
                dir,
                ca,
                server,
                device,
                files,
            }
        }

        fn ca_path(&self) -> PathBuf {
            self.dir.path().join("ca.pem")
        }

        fn with_client_ca(&self, required: bool) -> TlsFiles {
            TlsFiles {
                client_ca: Some(self.ca_path()),
                require_client_cert: required,
                ..self.files.clone()
            }
        }

        fn roots(&self) -> RootCertStore {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(self.ca.pem.as_bytes()) {
                roots.add(cert.unwrap()).unwrap();
            }
            roots
        }

        /// A client config trusting the CA, limited to `version`, offering `alpn`, optionally
        /// presenting `client_cert`. A fresh config each time, so nothing is resumed.
        fn client(
            &self,
            version: &'static rustls::SupportedProtocolVersion,
            alpn: &[&[u8]],
            client_cert: Option<&Leaf>,
        ) -> Arc<ClientConfig> {
            let builder = ClientConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(self.roots());
            let mut config = match client_cert {
                Some(leaf) => builder
                    .with_client_auth_cert(
                        vec![leaf.der.clone()],
                        PrivatePkcs8KeyDer::from(leaf.key_der.clone()).into(),
                    )
                    .unwrap(),
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        }
    }

    /// What each side saw of a handshake.
    #[derive(Debug)]
    struct ClientSide {
        server_cert: CertificateDer<'static>,
        alpn: Option<Vec<u8>>,
        version: Option<rustls::ProtocolVersion>,
    }

    #[derive(Debug)]
    struct ServerSide {
        client_cert: Option<CertificateDer<'static>>,
        alpn: Option<Vec<u8>>,
    }

    /// Runs one connection: the server completes the handshake and writes "ok"; the client
    /// succeeds only if it reads it.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        sni: &str,
    ) -> (io::Result<ClientSide>, io::Result<ServerSide>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
            let (_, conn) = tls.get_ref();
            let side = ServerSide {
                client_cert: conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.clone().into_owned()),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            };
            tls.write_all(b"ok").await?;
            tls.shutdown().await?;
            Ok::<_, io::Error>(side)
        });
        let name = upstream_server_name(sni).unwrap();
        let client_side = async {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await?;
            let (_, conn) = tls.get_ref();
            Ok(ClientSide {
                server_cert: conn.peer_certificates().unwrap()[0].clone().into_owned(),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                version: conn.protocol_version(),
            })
        };
        let client_result = tokio::time::timeout(DEADLINE, client_side)
            .await
            .expect("client timed out");
        let server_result = tokio::time::timeout(DEADLINE, server_task)
            .await
            .expect("server timed out")
            .unwrap();
        (client_result, server_result)
    }

    fn server(files: &TlsFiles) -> (Arc<ReloadingCert>, Arc<ServerConfig>) {
        let resolver = ReloadingCert::new(load_certified_key(files).unwrap());
        let config = server_config(files, Arc::clone(&resolver)).unwrap();
        (resolver, config)
    }

    #[test]
    fn loads_a_valid_pair() {
        let pki = Pki::new();
        let key = load_certified_key(&pki.files).unwrap();
        assert_eq!(key.cert, vec![pki.server.der.clone()]);
        assert!(load_certified_key(&pki.with_client_ca(true)).is_ok());
    }

    #[test]
    fn missing_file_names_it() {
        let pki = Pki::new();
        let files = TlsFiles {
            cert: pki.dir.path().join("nope.pem"),
            ..pki.files.clone()
        };
        let err = load_certified_key(&files).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("{}: cannot read", files.cert.display())),
            "{msg}"
        );
    }

    #[test]
    fn cert_file_without_certificate() {
        let pki = Pki::new();
        // A key where the cert should be: PEM is fine, but no CERTIFICATE section.
        std::fs::write(&pki.files.cert, &pki.server.key_pem).unwrap();
        let err = load_certified_key(&pki.files).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: no certificate found", pki.files.cert.display())
        );
        std::fs::write(&pki.files.cert, "").unwrap();
        assert!(matches!(
            load_certified_key(&pki.files),
            Err(TlsError::NoCertificate { .. })
        ));
        std::fs::write(&pki.files.cert, "-----BEGIN CERTIFICATE-----\n!!!\n").unwrap();
        assert!(matches!(
            load_certified_key(&pki.files),
            Err(TlsError::Pem { .. })
        ));
        std::fs::write(
            &pki.files.cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_certified_key(&pki.files).unwrap_err();
        assert!(
            matches!(err, TlsError::InvalidCertificate { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn key_file_without_key() {
        let pki = Pki::new();
        std::fs::write(&pki.files.key, &pki.server.cert_pem).unwrap();
        let err = load_certified_key(&pki.files).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: no private key (PKCS#8, PKCS#1 or SEC1) found",
                pki.files.key.display()
            )
        );
        std::fs::write(
            &pki.files.key,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(matches!(
            load_certified_key(&pki.files),
            Err(TlsError::EncryptedPrivateKey { .. })
        ));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let pki = Pki::new();
        let other = pki.ca.leaf(Some("other"), &["localhost"]);
        std::fs::write(&pki.files.key, &other.key_pem).unwrap();
        let err = load_certified_key(&pki.files).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} does not match {}",
                pki.files.key.display(),
                pki.files.cert.display()
            )
        );
    }

    #[test]
    fn client_ca_errors() {
        let pki = Pki::new();
        let files = pki.with_client_ca(true);
        std::fs::write(pki.ca_path(), "not a certificate\n").unwrap();
        let err = load_certified_key(&files).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: no CA certificate found", pki.ca_path().display())
        );
        let resolver = ReloadingCert::new(load_certified_key(&pki.files).unwrap());
        assert!(matches!(
            server_config(&files, resolver),
            Err(TlsError::NoCaCertificate { .. })
        ));

        let required_without_ca = TlsFiles {
            require_client_cert: true,
            ..pki.files.clone()
        };
        assert!(matches!(
            load_certified_key(&required_without_ca),
            Err(TlsError::ClientCertWithoutCa)
        ));
        assert!(matches!(
            upstream_client_config(&pki.dir.path().join("missing-ca.pem")),
            Err(TlsError::Read { .. })
        ));
        assert!(upstream_server_name("not a name!").is_err());
    }

    #[tokio::test]
    async fn tls13_and_tls12_with_alpn() {
        let pki = Pki::new();
        let (_resolver, config) = server(&pki.files);
        let cases: [(
            &'static rustls::SupportedProtocolVersion,
            rustls::ProtocolVersion,
        ); 2] = [
            (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
            (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        ];
        for (version, expected) in cases {
            for alpn in [&b"h2"[..], b"http/1.1"] {
                let client = pki.client(version, &[alpn], None);
                let (c, s) = handshake(Arc::clone(&config), client, "localhost").await;
                let (c, s) = (c.unwrap(), s.unwrap());
                assert_eq!(c.version, Some(expected));
                assert_eq!(c.alpn.as_deref(), Some(alpn));
                assert_eq!(s.alpn.as_deref(), Some(alpn));
                assert_eq!(c.server_cert, pki.server.der);
                assert!(s.client_cert.is_none());
            }
            // Offering both, the server's preference (h2) wins; offering none, none.
            let client = pki.client(version, &[b"http/1.1", b"h2"], None);
            let (c, _) = handshake(Arc::clone(&config), client, "localhost").await;
            assert_eq!(c.unwrap().alpn.as_deref(), Some(&b"h2"[..]));
            let client = pki.client(version, &[], None);
            let (c, _) = handshake(Arc::clone(&config), client, "localhost").await;
            assert_eq!(c.unwrap().alpn, None);
        }
    }

    #[tokio::test]
    async fn replace_rotates_for_new_handshakes() {
        let pki = Pki::new();
        let (resolver, config) = server(&pki.files);
        let client = || pki.client(&rustls::version::TLS13, &[b"h2"], None);
        let (c, _) = handshake(Arc::clone(&config), client(), "localhost").await;
        assert_eq!(c.unwrap().server_cert, pki.server.der);

        let next = pki.ca.leaf(Some("server-2"), &["localhost"]);
        std::fs::write(&pki.files.cert, &next.cert_pem).unwrap();
        std::fs::write(&pki.files.key, &next.key_pem).unwrap();
        resolver.replace(load_certified_key(&pki.files).unwrap());
        assert_ne!(next.der, pki.server.der);
        let (c, _) = handshake(Arc::clone(&config), client(), "localhost").await;
        assert_eq!(c.unwrap().server_cert, next.der);
        assert_eq!(
            resolver
                .current()
                .end_entity_cert()
                .ok()
                .and_then(client_cert_identity),
            Some("server-2".to_owned())
        );
    }

    /// Writes `contents` to `path` the way editors and cert tools do: temp file, then rename.
    fn write_atomically(path: &Path, contents: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// Handshakes until the server presents `want`, failing after [`DEADLINE`].
    async fn wait_for_cert(pki: &Pki, config: &Arc<ServerConfig>, want: &CertificateDer<'_>) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let client = pki.client(&rustls::version::TLS13, &[b"http/1.1"], None);
            let (c, _) = handshake(Arc::clone(config), client, "localhost").await;
            if c.unwrap().server_cert == *want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the rotated certificate was not served within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `cond` until true, failing after [`DEADLINE`].
    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn watcher_picks_up_renamed_files_and_keeps_old_cert_on_failure() {
        let pki = Pki::new();
        let (resolver, config) = server(&pki.files);
        let held = Arc::strong_count(&resolver); // this test and the server config
        let watcher = watch_cert_files(pki.files.clone(), Arc::clone(&resolver)).unwrap();

        let next = pki.ca.leaf(Some("server-2"), &["localhost"]);
        write_atomically(&pki.files.key, &next.key_pem);
        write_atomically(&pki.files.cert, &next.cert_pem);
        wait_for_cert(&pki, &config, &next.der).await;
        wait_until("reload counted", || watcher.reloads() >= 1).await;

        // A broken rotation is reported and the current certificate stays in service.
        let failures = watcher.failed_reloads();
        write_atomically(&pki.files.cert, "garbage\n");
        wait_until("failure counted", || watcher.failed_reloads() > failures).await;
        let client = pki.client(&rustls::version::TLS12, &[b"h2"], None);
        let (c, _) = handshake(Arc::clone(&config), client, "localhost").await;
        assert_eq!(c.unwrap().server_cert, next.der);

        // Fixing the files is picked up again.
        let third = pki.ca.leaf(Some("server-3"), &["localhost"]);
        write_atomically(&pki.files.key, &third.key_pem);
        write_atomically(&pki.files.cert, &third.cert_pem);
        wait_for_cert(&pki, &config, &third.der).await;

        // Dropping the guard stops the task: it lets go of the resolver, so nothing can
        // replace the certificate any more.
        drop(watcher);
        wait_until("watcher task stopped", || {
            Arc::strong_count(&resolver) == held
        })
        .await;
        let fourth = pki.ca.leaf(Some("server-4"), &["localhost"]);
        write_atomically(&pki.files.key, &fourth.key_pem);
        write_atomically(&pki.files.cert, &fourth.cert_pem);
        assert_eq!(resolver.current().cert, vec![third.der.clone()]);
    }

    /// The Kubernetes Secret layout: `tls.crt -> ..data/tls.crt`, `..data -> ..<timestamp>`,
    /// rotated by creating a new timestamp dir and renaming a new `..data` symlink over the old.
    #[cfg(unix)]
    #[tokio::test]
    async fn watcher_follows_kubernetes_data_swap() {
        use std::os::unix::fs::symlink;
        let pki = Pki::new();
        let mount = pki.dir.path().join("mount");
        let write_version = |name: &str, leaf: &Leaf| {
            let dir = mount.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("tls.crt"), &leaf.cert_pem).unwrap();
            std::fs::write(dir.join("tls.key"), &leaf.key_pem).unwrap();
        };
        write_version("..2025_01_01", &pki.server);
        symlink("..2025_01_01", mount.join("..data")).unwrap();
        symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
        symlink("..data/tls.key", mount.join("tls.key")).unwrap();
        let files = TlsFiles {
            cert: mount.join("tls.crt"),
            key: mount.join("tls.key"),
            client_ca: None,
            require_client_cert: false,
        };
        let (resolver, config) = server(&files);
        let _watcher = watch_cert_files(files, resolver).unwrap();

        let next = pki.ca.leaf(Some("server-2"), &["localhost"]);
        write_version("..2025_02_01", &next);
        symlink("..2025_02_01", mount.join("..data_tmp")).unwrap();
        std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        std::fs::remove_dir_all(mount.join("..2025_01_01")).unwrap();
        wait_for_cert(&pki, &config, &next.der).await;
    }

    #[test]
    fn watcher_needs_a_runtime() {
        let pki = Pki::new();
        let resolver = ReloadingCert::new(load_certified_key(&pki.files).unwrap());
        assert!(matches!(
            watch_cert_files(pki.files.clone(), resolver),
            Err(TlsError::NoRuntime)
        ));
    }

    #[test]
    fn watched_dirs_are_parents_as_configured() {
        let files = TlsFiles {
            cert: PathBuf::from("cert.pem"),
            key: PathBuf::from("/etc/fwgate/tls/key.pem"),
            client_ca: None,
            require_client_cert: false,
        };
        let expected: BTreeSet<PathBuf> = [".", "/etc/fwgate/tls"]
            .into_iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(watched_dirs(&files), expected);
        let same = TlsFiles {
            cert: PathBuf::from("/s/tls.crt"),
            key: PathBuf::from("/s/tls.key"),
            ..files
        };
        assert_eq!(watched_dirs(&same).len(), 1);
    }

    #[tokio::test]
    async fn required_client_cert() {
        let pki = Pki::new();
        let files = pki.with_client_ca(true);
        let (_resolver, config) = server(&files);
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = pki.client(version, &[b"http/1.1"], None);
            let (c, s) = handshake(Arc::clone(&config), client, "localhost").await;
            assert!(s.is_err(), "server accepted a client without certificate");
            assert!(c.is_err(), "client read data without a certificate");

            let client = pki.client(version, &[b"http/1.1"], Some(&pki.device));
            let (c, s) = handshake(Arc::clone(&config), client, "localhost").await;
            c.unwrap();
            let peer = s.unwrap().client_cert.expect("client certificate");
            assert_eq!(peer, pki.device.der);
            assert_eq!(client_cert_identity(&peer).as_deref(), Some("device-42"));
        }

        // A certificate from another CA is refused.
        let stranger = Ca::new("other CA").leaf(Some("device-666"), &[]);
        let client = pki.client(&rustls::version::TLS13, &[], Some(&stranger));
        let (_, s) = handshake(Arc::clone(&config), client, "localhost").await;
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn optional_client_cert() {
        let pki = Pki::new();
        let files = pki.with_client_ca(false);
        let (_resolver, config) = server(&files);
        let client = pki.client(&rustls::version::TLS13, &[], None);
        let (c, s) = handshake(Arc::clone(&config), client, "localhost").await;
        c.unwrap();
        assert!(s.unwrap().client_cert.is_none());

        let client = pki.client(&rustls::version::TLS13, &[], Some(&pki.device));
        let (_, s) = handshake(Arc::clone(&config), client, "localhost").await;
        let peer = s.unwrap().client_cert.unwrap();
        assert_eq!(client_cert_identity(&peer).as_deref(), Some("device-42"));

        // Presented but not verifiable: still refused.
        let stranger = Ca::new("other CA").leaf(Some("device-666"), &[]);
        let client = pki.client(&rustls::version::TLS13, &[], Some(&stranger));
        let (_, s) = handshake(Arc::clone(&config), client, "localhost").await;
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn upstream_client_connects_with_sni() {
        let pki = Pki::new();
        let (_resolver, config) = server(&pki.files);
        let client = upstream_client_config(&pki.ca_path()).unwrap();
        let (c, s) = handshake(Arc::clone(&config), client, "localhost").await;
        let c = c.unwrap();
        assert_eq!(c.server_cert, pki.server.der);
        assert_eq!(c.alpn.as_deref(), Some(UPSTREAM_ALPN));
        assert_eq!(s.unwrap().alpn.as_deref(), Some(UPSTREAM_ALPN));

        // The name is checked against the certificate.
        let client = upstream_client_config(&pki.ca_path()).unwrap();
        let (c, _) = handshake(Arc::clone(&config), client, "backend.example").await;
        assert!(c.is_err());
    }

    #[test]
    fn identity_from_cn_then_dns_san() {
        let ca = Ca::new("fwgate test CA");
        let both = ca.leaf(Some("device-42"), &["device-42.fleet.example"]);
        assert_eq!(
            client_cert_identity(&both.der).as_deref(),
            Some("device-42")
        );
        let san_only = ca.leaf(None, &["10.0.0.9", "device-43.fleet.example", "x.example"]);
        assert_eq!(
            client_cert_identity(&san_only.der).as_deref(),
            Some("device-43.fleet.example")
        );
        let nothing = ca.leaf(None, &["10.0.0.9"]);
        assert_eq!(client_cert_identity(&nothing.der), None);
        let bad_cn = ca.leaf(Some("evil\nname"), &["fallback.example"]);
        assert_eq!(
            client_cert_identity(&bad_cn.der).as_deref(),
            Some("fallback.example")
        );
        let ca_cert = CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap();
        assert_eq!(
            client_cert_identity(&ca_cert).as_deref(),
            Some("fwgate test CA")
        );
    }

    #[test]
    fn identity_string_types() {
        assert_eq!(
            x509::common_name(&name_with(0x1e, &[0, b'd', 0, b'-', 0, b'1'])).as_deref(),
            Some("d-1")
        );
        assert_eq!(
            x509::common_name(&name_with(0x13, b"dev 7")).as_deref(),
            Some("dev 7")
        );
        assert_eq!(x509::common_name(&name_with(0x13, &[0xff])), None);
        assert_eq!(x509::common_name(&name_with(0x1e, &[0, b'd', 0])), None);
        assert_eq!(
            x509::common_name(&name_with(0x1c, &[0, 0, 0, b'z'])).as_deref(),
            Some("z")
        );
    }

    /// DER of a Name with one CN attribute of string type `tag`.
    fn name_with(tag: u8, value: &[u8]) -> Vec<u8> {
        fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
            let mut out = vec![tag, u8::try_from(contents.len()).unwrap()];
            out.extend_from_slice(contents);
            out
        }
        let attribute = [tlv(0x06, &[0x55, 0x04, 0x03]), tlv(tag, value)].concat();
        tlv(0x31, &tlv(0x30, &attribute))
    }

    /// Never panics, whatever the bytes: random strings, every truncation of a real
    /// certificate, and random corruptions of it.
    #[test]
    fn identity_never_panics_on_garbage() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        assert_eq!(client_cert_identity(&CertificateDer::from(vec![])), None);
        for _ in 0..3000 {
            let len = (next() % 400) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && !bytes.is_empty() {
                bytes[0] = 0x30; // look like a SEQUENCE more often
            }
            let _ = client_cert_identity(&CertificateDer::from(bytes));
        }
        let device = Ca::new("ca").leaf(Some("device-42"), &["d.example"]);
        let real = device.der.as_ref().to_vec();
        for end in 0..real.len() {
            let truncated = CertificateDer::from(real[..end].to_vec());
            assert_eq!(client_cert_identity(&truncated), None, "truncated at {end}");
        }
        for _ in 0..3000 {
            let mut bytes = real.clone();
            for _ in 0..(1 + next() % 4) {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            if let Some(identity) = client_cert_identity(&CertificateDer::from(bytes)) {
                assert!(acceptable_identity(&identity));
            }
        }
    }

    #[test]
    fn only_changes_wake_the_watcher() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            notify::event::AccessMode::Any
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Create(
            notify::event::CreateKind::Any
        )));
        assert!(is_change(&EventKind::Any));
    }
}
