//! TLS termination: WebSocket and HTTP/1.1 over TLS, HTTP/2 over TLS through the same rules,
//! certificate rotation without a restart, and the device id from a client certificate.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

/// A throwaway CA in the proxy's directory, signing server and device certificates.
pub struct TestPki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "fwgate test CA");
        let ca_pem = params.self_signed(&key).unwrap().pem();
        TestPki {
            issuer: Issuer::new(params, key),
            ca_pem,
        }
    }

    /// (cert PEM, key PEM) for `cn` with `sans`.
    fn issue(&self, cn: &str, sans: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        (
            params.signed_by(&key, &self.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    /// Writes server cert, key and CA into `dir` (cert and key replaced atomically).
    fn install_server_cert(&self, dir: &std::path::Path, cn: &str) {
        let (cert, key) = self.issue(cn, &["localhost", "127.0.0.1"]);
        for (name, body) in [("key.pem", key), ("cert.pem", cert)] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, body).unwrap();
            std::fs::rename(&tmp, dir.join(name)).unwrap();
        }
        std::fs::write(dir.join("ca.pem"), &self.ca_pem).unwrap();
    }

    pub fn client(&self, alpn: &[&[u8]], device: Option<&str>) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(fwgate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match device {
            None => builder.with_no_client_auth(),
            Some(cn) => {
                let (cert, key) = self.issue(cn, &[]);
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect();
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

const TLS_CONFIG: &str = "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nclient_ca = \"ca.pem\"\n";
const RULES: &str = r#"
[version]
sources = [ { header = "x-firmware-version" } ]
device_id = [ { client_cert = "identity" }, { header = "x-device-id" } ]
[[rule]]
name = "block"
versions = ">=3.8.0-b3"
action = "deny"
status = 503
"#;

/// Starts fwgate with TLS: the certificate files must exist before it starts.
pub async fn start_tls_proxy(pki: &TestPki, upstream: std::net::SocketAddr) -> Proxy {
    start_tls_proxy_with(pki, upstream, RULES).await
}

/// [`start_tls_proxy`] with other rules.
pub async fn start_tls_proxy_with(
    pki: &TestPki,
    upstream: std::net::SocketAddr,
    rules: &str,
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    pki.install_server_cert(dir.path(), "server-1");
    std::fs::write(dir.path().join("rules.toml"), rules).unwrap();
    start_proxy_in(dir, upstream, TLS_CONFIG).await
}

pub async fn connect(
    proxy: &Proxy,
    connector: &TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with fwgate")
}

#[tokio::test]
async fn websocket_through_tls_with_the_device_id_from_the_client_certificate() {
    let pki = TestPki::new();
    let backend = ws_backend().await;
    let proxy = start_tls_proxy(&pki, backend.addr).await;
    let tls = connect(&proxy, &pki.client(&[b"http/1.1"], Some("device-tls-7"))).await;
    let mut req = "wss://localhost/ws"
        .parse::<http::Uri>()
        .unwrap()
        .into_client_request_ok();
    req.headers_mut()
        .insert("x-firmware-version", "3.7.0".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("wss handshake");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("over tls"));
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    eventually("tunnel log line names the certificate's device", || async {
        captured_logs()
            .lines()
            .any(|l| l.contains("device=\"device-tls-7\"") && l.contains("tunnel closed"))
    })
    .await;
    // A refused version over TLS is refused just the same.
    let tls = connect(&proxy, &pki.client(&[b"http/1.1"], None)).await;
    let mut req = "wss://localhost/ws"
        .parse::<http::Uri>()
        .unwrap()
        .into_client_request_ok();
    req.headers_mut()
        .insert("x-firmware-version", "3.8.0".parse().unwrap());
    match tokio_tungstenite::client_async(req, tls).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    proxy.stop().await;
}

#[tokio::test]
async fn http2_through_tls_goes_through_the_same_rules() {
    let pki = TestPki::new();
    let backend = http_backend().await;
    let proxy = start_tls_proxy(&pki, backend.addr).await;
    let tls = connect(&proxy, &pki.client(&[b"h2", b"http/1.1"], None)).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = |version: &str| {
        http::Request::builder()
            .uri("https://localhost/headers")
            .header("x-firmware-version", version)
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let resp = sender.send_request(request("3.7.0")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("host: localhost"),
        "Host from :authority must reach the backend: {body}"
    );
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    // Same connection, refused version: 503 from the rule, no backend request.
    let before = backend.requests();
    let resp = sender.send_request(request("3.8.0")).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(backend.requests(), before);
    proxy.stop().await;
}

#[tokio::test]
async fn rotated_certificate_is_used_by_new_handshakes() {
    let pki = TestPki::new();
    let backend = http_backend().await;
    let proxy = start_tls_proxy(&pki, backend.addr).await;
    let connector = pki.client(&[b"http/1.1"], None);
    let served_cn = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        fwgate::tls::client_cert_identity(&der)
    };
    assert_eq!(
        served_cn(&connect(&proxy, &connector).await).as_deref(),
        Some("server-1")
    );
    pki.install_server_cert(proxy.dir.path(), "server-2");
    eventually("new handshakes present the rotated certificate", || {
        let (proxy, connector) = (&proxy, &connector);
        async move { served_cn(&connect(proxy, connector).await).as_deref() == Some("server-2") }
    })
    .await;
    proxy.stop().await;
}

#[test]
fn check_validates_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fwgate.toml"),
        "[tls]\ncert = \"missing-cert.pem\"\nkey = \"missing-key.pem\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fwgate"))
        .args([
            "check",
            "--config",
            dir.path().join("fwgate.toml").to_str().unwrap(),
        ])
        .env_remove("FWGATE_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("missing-cert.pem"), "{text}");
}

/// `IntoClientRequest` for a parsed URI, without unwrap noise at call sites.
pub trait ClientRequestExt {
    fn into_client_request_ok(self) -> http::Request<()>;
}

impl ClientRequestExt for http::Uri {
    fn into_client_request_ok(self) -> http::Request<()> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        self.into_client_request().unwrap()
    }
}

/// A backend that only speaks TLS: WebSocket echo on `/ws`, "tls backend ok" otherwise.
async fn tls_backend(pki: &TestPki) -> (std::net::SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    pki.install_server_cert(dir.path(), "backend");
    let files = fwgate::tls::TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        client_ca: None,
        require_client_cert: false,
    };
    let key = fwgate::tls::load_certified_key(&files).unwrap();
    let config = fwgate::tls::server_config(&files, fwgate::tls::ReloadingCert::new(key)).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // Peek at the request line to route: WebSocket or plain HTTP.
                let mut tls = tokio::io::BufStream::new(tls);
                use tokio::io::AsyncBufReadExt;
                let Ok(head) = tls.fill_buf().await else {
                    return;
                };
                if head.starts_with(b"GET /ws") {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                        return;
                    };
                    while let Some(Ok(m)) = ws.next().await {
                        if m.is_text() && ws.send(m).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from_static(b"tls backend ok")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                }
            });
        }
    });
    (addr, dir)
}

#[tokio::test]
async fn tls_to_the_backend_is_verified_against_the_configured_ca() {
    let pki = TestPki::new();
    let (backend, backend_dir) = tls_backend(&pki).await;
    let ca = backend_dir.path().join("ca.pem");
    let upstream_tls = format!(
        "[upstream]\ntls = true\nca_file = \"{}\"\nserver_name = \"localhost\"\n",
        ca.display()
    );
    let proxy = start_proxy("# defaults\n", backend, &upstream_tls).await;
    // The tunnel first: this test backend picks WebSocket or HTTP once per connection, and a
    // plain request would leave a pooled HTTP connection for the upgrade to reuse.
    let mut ws = ws_connect(proxy.addr, "/ws", &[])
        .await
        .expect("tunnel over a TLS backend leg");
    ws.send(Message::text("both legs")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("both legs")
    );
    let (status, _, body) = get(proxy.addr, "/", &[]).await;
    assert_eq!((status, body.as_str()), (200, "tls backend ok"));
    proxy.stop().await;

    // A name the certificate does not carry fails verification: 502, never plaintext.
    let wrong = upstream_tls.replace("localhost", "not-the-backend.example");
    let proxy = start_proxy("# defaults\n", backend, &wrong).await;
    assert_eq!(get(proxy.addr, "/", &[]).await.0, 502);
    proxy.stop().await;
}

/// The client CA is hot-reloaded like the certificate: a device signed by a new CA is refused
/// until the CA file names that CA, then admitted, without a restart.
#[tokio::test]
async fn a_rotated_client_ca_applies_to_new_handshakes() {
    let pki = TestPki::new();
    let new_ca = TestPki::new();
    let backend = http_backend().await;
    let dir = tempfile::tempdir().unwrap();
    pki.install_server_cert(dir.path(), "server-1");
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    let proxy = start_proxy_in(
        dir,
        backend.addr,
        "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\nclient_ca = \"ca.pem\"\nrequire_client_cert = true\n",
    )
    .await;
    // Trusts fwgate's certificate (old CA), presents a device certificate from the new CA.
    let device = {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let (cert, key) = new_ca.issue("device-new-ca", &[]);
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(fwgate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        TlsConnector::from(Arc::new(config))
    };
    // The handshake itself may complete before the server's verdict arrives (TLS 1.3): an
    // exchange shows whether the connection was accepted.
    let accepted = |connector: TlsConnector, addr: std::net::SocketAddr| async move {
        let Ok(tcp) = TcpStream::connect(addr).await else {
            return false;
        };
        let Ok(mut tls) = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
        else {
            return false;
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if tls
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut out)).await;
        out.starts_with(b"HTTP/1.1 ")
    };
    assert!(
        !accepted(device.clone(), proxy.addr).await,
        "a device of an unknown CA was admitted"
    );
    // Rotation: the CA file now holds both CAs.
    let bundle = format!("{}{}", pki.ca_pem, new_ca.ca_pem);
    let tmp = proxy.dir.path().join(".ca.pem.tmp");
    std::fs::write(&tmp, bundle).unwrap();
    std::fs::rename(&tmp, proxy.dir.path().join("ca.pem")).unwrap();
    eventually("a device of the new CA is admitted", || {
        let device = device.clone();
        let addr = proxy.addr;
        async move { accepted(device, addr).await }
    })
    .await;
    proxy.stop().await;
}
