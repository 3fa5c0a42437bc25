//! The device identity carried by a client certificate, read with a small bounded DER reader.

use rustls_pki_types::CertificateDer;

/// Longest device identity [`client_cert_identity`] returns; longer names are not used.
const MAX_IDENTITY_LEN: usize = 255;

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
pub(super) fn acceptable_identity(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_IDENTITY_LEN && !s.chars().any(char::is_control)
}

/// Just enough DER/X.509 to find the subject CN and the DNS subjectAltNames. Every read is
/// bounds-checked and every loop consumes input, so the work is linear in the input size.
pub(super) mod x509 {
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
    pub(in crate::tls) fn common_name(name: &[u8]) -> Option<String> {
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
