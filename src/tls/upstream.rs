//! The client side of TLS: the configuration for TLS to the backend, and the stream type of a
//! client connection that may or may not be TLS (backend, etcd).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::certs::load_roots;
use super::{crypto_provider, TlsError};

/// ALPN protocol offered to the backend: the forwarding client speaks HTTP/1.1 only.
pub const UPSTREAM_ALPN: &[u8] = b"http/1.1";

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

/// A client connection, plain TCP or TLS: to the backend (plain is the common case, eligible
/// for the buffer-free tunnel) or to an etcd endpoint.
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
