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
//!
//! # Layout
//!
//! - this file: the configured files ([`TlsFiles`]), the errors ([`TlsError`]), the provider;
//! - `certs`: reading and checking certificate, key and CA files;
//! - `server`: the server configuration; `reload`: the reloading certificate and its watcher;
//! - `identity`: the device identity in a client certificate;
//! - `upstream`: the client configuration for TLS to the backend.

mod certs;
mod identity;
mod reload;
mod server;
#[cfg(test)]
mod tests;
mod upstream;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem;

pub use self::certs::load_certified_key;
pub use self::identity::client_cert_identity;
pub use self::reload::{
    watch_cert_files, watch_tls_files, CertWatcher, ReloadingCert, SharedServerConfig,
    CERT_RECHECK_INTERVAL, CERT_RELOAD_DEBOUNCE,
};
pub use self::server::{server_config, SERVER_ALPN};
pub use self::upstream::{
    upstream_client_config, upstream_server_name, ClientStream, UPSTREAM_ALPN,
};

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
