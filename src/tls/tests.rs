//! Tests of the TLS module over real handshakes on loopback, with certificates made by rcgen.

use super::identity::{acceptable_identity, x509};
use super::reload::{is_change, watched_dirs};
use super::*;
use notify::event::{AccessKind, AccessMode};
use notify::EventKind;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
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
    let config = server_config(files, resolver.clone()).unwrap();
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
