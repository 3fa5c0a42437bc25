//! Reading and checking certificate files: the serving chain and key (a key that does not
//! belong to the certificate is an error), and CA files as trust anchors.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{TlsError, TlsFiles};

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
pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
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
pub(super) fn certified_key_from_pem(
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
pub(super) fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
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
