//! The server configuration for the device listener.

use std::sync::Arc;

use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::ServerConfig;

use super::certs::load_roots;
use super::{crypto_provider, TlsError, TlsFiles};

/// ALPN protocols the server offers, in preference order: HTTP/2 for plain requests, HTTP/1.1
/// for everything else (WebSocket upgrades need HTTP/1.1).
pub const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Builds the server configuration: TLS 1.2 and 1.3 with the `ring` provider, ALPN `h2` then
/// `http/1.1`, the serving certificate from `resolver`, and, when `files.client_ca` is set,
/// client certificates verified against that CA (required or "verified if presented",
/// according to `files.require_client_cert`). The client CA is read here; the watcher
/// ([`super::watch_tls_files`]) builds a new configuration when it changes.
pub fn server_config(
    files: &TlsFiles,
    resolver: Arc<dyn ResolvesServerCert>,
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
