//! Connections to etcd endpoints: TCP, optionally TLS (rustls with the `ring` provider, a
//! private CA and an optional client certificate), each bounded by the connect timeout, then
//! HTTP/1.1 through hyper's client connection (the client already in the tree).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::config::{EtcdEndpoint, FleetConfig};

/// A connection to one endpoint: `http://` (plain) or `https://` (TLS).
type Stream = crate::tls::ClientStream;

/// The endpoints and how to connect to them.
pub struct Transport {
    /// As configured.
    pub endpoints: Vec<EtcdEndpoint>,
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
}

/// An HTTP/1.1 connection ready for requests; its driver task is aborted when this is dropped.
pub struct Connection<B> {
    /// Sends requests.
    pub sender: SendRequest<B>,
    driver: JoinHandle<()>,
}

impl<B> Drop for Connection<B> {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Transport {
    /// Loads the TLS files the configuration names (errors name the file).
    pub fn new(config: &FleetConfig) -> Result<Transport, String> {
        let tls = match &config.ca_file {
            Some(ca) if config.endpoints.iter().any(|e| e.tls) => {
                let client = client_config(ca, config.client_cert.as_ref())?;
                Some(tokio_rustls::TlsConnector::from(client))
            }
            _ => None,
        };
        Ok(Transport {
            endpoints: config.endpoints.clone(),
            tls,
            connect_timeout: config.connect_timeout,
        })
    }

    /// Opens an HTTP/1.1 connection to endpoint `index` within the connect timeout.
    pub async fn connect<B>(&self, index: usize) -> Result<Connection<B>, String>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let ep = self
            .endpoints
            .get(index)
            .ok_or_else(|| "no such endpoint".to_string())?;
        let stream = tokio::time::timeout(self.connect_timeout, self.open(ep))
            .await
            .map_err(|_| format!("no connection within {:?}", self.connect_timeout))??;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection { sender, driver })
    }

    async fn open(&self, ep: &EtcdEndpoint) -> Result<Stream, String> {
        let tcp = TcpStream::connect(ep.authority())
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if !ep.tls {
            return Ok(Stream::Plain(tcp));
        }
        let connector = self
            .tls
            .as_ref()
            .ok_or_else(|| "https:// endpoint without [fleet] ca_file".to_string())?;
        let name = ServerName::try_from(ep.host.clone())
            .map_err(|e| format!("invalid TLS name {:?}: {e}", ep.host))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// TLS to etcd: TLS 1.2/1.3 with `ring`, trusting only `ca_file` (etcd runs on a private CA),
/// presenting the client certificate when configured (etcd's `--client-cert-auth`).
pub fn client_config(
    ca_file: &Path,
    client_cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<Arc<ClientConfig>, String> {
    let ca_pem =
        std::fs::read(ca_file).map_err(|e| format!("{}: cannot read: {e}", ca_file.display()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{}: no CA certificate (expected PEM CERTIFICATE sections)",
            ca_file.display()
        ));
    }
    let builder = ClientConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let cert_pem =
                std::fs::read(cert).map_err(|e| format!("{}: cannot read: {e}", cert.display()))?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!("{}: no certificate", cert.display()));
            }
            let key_pem =
                std::fs::read(key).map_err(|e| format!("{}: cannot read: {e}", key.display()))?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("{}: no usable private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("{}: {e}", key.display()))?
        }
    };
    Ok(Arc::new(config))
}
