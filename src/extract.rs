//! Where a device's firmware version (and device id) comes from: an ordered list of sources
//! (a header, a header with a regex capture, a query parameter); the first that yields a value
//! wins. Extraction borrows from the request and allocates nothing unless a regex is used.

use http::header::{HeaderMap, HeaderName};
use regex::Regex;

use crate::version::{FirmwareVersion, ParseError, MAX_VERSION_LEN};

/// Longest device id kept for logs and keys; longer ids are truncated (bounded memory per connection).
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// One place to look for a value.
#[derive(Debug, Clone)]
pub enum Source {
    /// The first value of a request header, optionally narrowed by a regex capture.
    Header {
        /// Header name (lower case).
        name: HeaderName,
        /// Optional pattern; the value is its `version`/`id` named group, else group 1, else the match.
        pattern: Option<Pattern>,
    },
    /// A query-string parameter (percent-decoded; `+` is kept as `+` because versions use it).
    Query {
        /// Parameter name.
        name: Box<str>,
    },
    /// The identity of a verified TLS client certificate (CN, else first DNS SAN), optionally
    /// narrowed by a regex capture (e.g. a version embedded in the CN).
    ClientCert {
        /// Optional pattern, as for headers.
        pattern: Option<Pattern>,
    },
}

/// A compiled pattern and the capture group holding the value.
#[derive(Debug, Clone)]
pub struct Pattern {
    regex: Regex,
    group: usize,
}

impl Pattern {
    /// Compiles `pattern`, choosing the capture group named `preferred` (e.g. `version`), else group 1, else the whole match.
    pub fn new(pattern: &str, preferred: &str) -> Result<Pattern, regex::Error> {
        let regex = Regex::new(pattern)?;
        let group = regex
            .capture_names()
            .position(|n| n == Some(preferred))
            .unwrap_or(if regex.captures_len() > 1 { 1 } else { 0 });
        Ok(Pattern { regex, group })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        self.regex.as_str()
    }

    fn capture<'a>(&self, text: &'a str) -> Option<&'a str> {
        if self.group == 0 {
            return self.regex.find(text).map(|m| m.as_str());
        }
        self.regex
            .captures(text)
            .and_then(|c| c.get(self.group))
            .map(|m| m.as_str())
    }
}

impl Source {
    /// A short description for logs and `explain` (`header user-agent ~ /…/`, `query fw`).
    pub fn describe(&self) -> String {
        match self {
            Source::Header {
                name,
                pattern: None,
            } => format!("header {name}"),
            Source::Header {
                name,
                pattern: Some(p),
            } => format!("header {name} ~ /{}/", p.as_str()),
            Source::Query { name } => format!("query {name}"),
            Source::ClientCert { pattern: None } => "client certificate identity".into(),
            Source::ClientCert { pattern: Some(p) } => {
                format!("client certificate identity ~ /{}/", p.as_str())
            }
        }
    }
}

/// A value found in the request, still raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found<'a> {
    /// Index of the source that produced it.
    pub source: usize,
    /// The bytes as they appeared on the wire.
    pub raw: &'a [u8],
    /// Whether `raw` is percent-encoded (query parameters).
    pub percent_encoded: bool,
}

impl Found<'_> {
    /// The raw value for logs: lossy UTF-8, truncated, control characters replaced.
    pub fn display(&self, max: usize) -> String {
        let cut = &self.raw[..self.raw.len().min(max)];
        String::from_utf8_lossy(cut)
            .chars()
            .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
            .collect()
    }

    /// Parses the value as a firmware version, decoding it first when needed; never allocates.
    pub fn parse_version(&self) -> Result<FirmwareVersion, ParseError> {
        if !self.percent_encoded || !self.raw.contains(&b'%') {
            return FirmwareVersion::parse_bytes(self.raw);
        }
        let mut buf = [0u8; MAX_VERSION_LEN + 1];
        match percent_decode_into(self.raw, &mut buf) {
            Some(n) => FirmwareVersion::parse_bytes(&buf[..n]),
            // Longer than any valid version (or badly encoded): let the parser say why.
            None => FirmwareVersion::parse_bytes(self.raw),
        }
    }
}

/// Decodes `%XX` escapes into `out`; None if the result does not fit or an escape is malformed.
fn percent_decode_into(input: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut i = 0;
    let mut n = 0;
    while i < input.len() {
        let b = if input[i] == b'%' {
            let hex = input.get(i + 1..i + 3)?;
            let s = std::str::from_utf8(hex).ok()?;
            i += 3;
            u8::from_str_radix(s, 16).ok()?
        } else {
            i += 1;
            input[i - 1]
        };
        *out.get_mut(n)? = b;
        n += 1;
    }
    Some(n)
}

/// Where request headers are looked up: hyper's `HeaderMap`, or the raw head that the
/// HTTP/1.1 fast path parsed without building one. Both give the same answers.
pub trait HeaderSource {
    /// The first value of `name`, as bytes on the wire.
    fn value(&self, name: &HeaderName) -> Option<&[u8]>;
    /// Every value of `name`, in order.
    fn values(&self, name: &HeaderName) -> Vec<&[u8]>;
}

impl HeaderSource for HeaderMap {
    fn value(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }

    fn values(&self, name: &HeaderName) -> Vec<&[u8]> {
        self.get_all(name).iter().map(|v| v.as_bytes()).collect()
    }
}

impl HeaderSource for [httparse::Header<'_>] {
    fn value(&self, name: &HeaderName) -> Option<&[u8]> {
        let name = name.as_str();
        self.iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    fn values(&self, name: &HeaderName) -> Vec<&[u8]> {
        let name = name.as_str();
        self.iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect()
    }
}

/// Whether a header value is visible ASCII (tab allowed), as `HeaderValue::to_str` accepts
/// it: for callers that only compare or copy the bytes and need no `str`.
pub fn is_visible_ascii(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// A header value as text when it is visible ASCII (tab allowed), exactly as
/// `HeaderValue::to_str` accepts it.
pub fn visible_ascii(value: &[u8]) -> Option<&str> {
    if is_visible_ascii(value) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// An ordered list of sources.
#[derive(Debug, Clone, Default)]
pub struct Extractor {
    sources: Vec<Source>,
}

impl Extractor {
    /// Builds an extractor; order matters (first yielding source wins).
    pub fn new(sources: Vec<Source>) -> Extractor {
        Extractor { sources }
    }

    /// The sources, in order.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// The first value any source yields. Empty values count as absent.
    pub fn extract<'a, H: HeaderSource + ?Sized>(
        &self,
        headers: &'a H,
        query: Option<&'a str>,
    ) -> Option<Found<'a>> {
        self.extract_with_cert(headers, query, None)
    }

    /// As [`Extractor::extract`], with the connection's client-certificate identity available.
    pub fn extract_with_cert<'a, H: HeaderSource + ?Sized>(
        &self,
        headers: &'a H,
        query: Option<&'a str>,
        cert_identity: Option<&'a str>,
    ) -> Option<Found<'a>> {
        self.sources
            .iter()
            .enumerate()
            .find_map(|(i, s)| find(i, s, headers, query, cert_identity))
    }
}

fn find<'a, H: HeaderSource + ?Sized>(
    index: usize,
    source: &Source,
    headers: &'a H,
    query: Option<&'a str>,
    cert_identity: Option<&'a str>,
) -> Option<Found<'a>> {
    let (raw, percent_encoded) = match source {
        Source::Header { name, pattern } => {
            let value = headers.value(name)?;
            match pattern {
                None => (value, false),
                Some(p) => {
                    let text = visible_ascii(value)?;
                    (p.capture(text)?.as_bytes(), false)
                }
            }
        }
        Source::Query { name } => {
            let value = query?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == &**name).then_some(v)
            })?;
            (value.as_bytes(), true)
        }
        Source::ClientCert { pattern } => {
            let identity = cert_identity?;
            match pattern {
                None => (identity.as_bytes(), false),
                Some(p) => (p.capture(identity)?.as_bytes(), false),
            }
        }
    };
    if raw.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(Found {
        source: index,
        raw,
        percent_encoded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn airtame() -> Extractor {
        Extractor::new(vec![
            Source::Header {
                name: HeaderName::from_static("x-firmware-version"),
                pattern: None,
            },
            Source::Header {
                name: HeaderName::from_static("user-agent"),
                pattern: Some(Pattern::new(r"^Airtame/(?P<version>\S+)", "version").unwrap()),
            },
            Source::Query { name: "fw".into() },
        ])
    }

    #[test]
    fn first_yielding_source_wins() {
        let e = airtame();
        let h = headers(&[
            ("x-firmware-version", "1.0.0"),
            ("user-agent", "Airtame/2.0.0"),
        ]);
        let f = e.extract(&h, Some("fw=3.0.0")).unwrap();
        assert_eq!((f.source, f.raw), (0, &b"1.0.0"[..]));

        let h = headers(&[("user-agent", "Airtame/3.8.0-b3 (linux)")]);
        let f = e.extract(&h, Some("fw=3.0.0")).unwrap();
        assert_eq!((f.source, f.raw), (1, &b"3.8.0-b3"[..]));

        let h = headers(&[("user-agent", "curl/8")]);
        let f = e.extract(&h, Some("a=1&fw=v3.9&b")).unwrap();
        assert_eq!((f.source, f.raw), (2, &b"v3.9"[..]));

        assert!(e.extract(&h, Some("fwx=1")).is_none());
        assert!(e.extract(&HeaderMap::new(), None).is_none());
    }

    #[test]
    fn empty_values_are_absent() {
        let e = airtame();
        let h = headers(&[("x-firmware-version", "  ")]);
        assert!(e.extract(&h, Some("fw=")).is_none());
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let e = airtame();
        let none = HeaderMap::new();
        let f = e.extract(&none, Some("fw=3.8.0%2Bbuild.5")).unwrap();
        let v = f.parse_version().unwrap();
        assert_eq!(v.to_string(), "3.8.0");
        let f = e.extract(&none, Some("fw=3.8.0-b3")).unwrap();
        assert_eq!(f.parse_version().unwrap().to_string(), "3.8.0-b3");
        let f = e.extract(&none, Some("fw=%zz")).unwrap();
        assert!(f.parse_version().is_err());
    }

    #[test]
    fn pattern_group_choice() {
        assert_eq!(
            Pattern::new(r"x/(\S+)", "version")
                .unwrap()
                .capture("x/1.2"),
            Some("1.2")
        );
        assert_eq!(
            Pattern::new(r"\d+\.\d+", "version")
                .unwrap()
                .capture("v 1.2"),
            Some("1.2")
        );
        assert_eq!(
            Pattern::new(r"(a)/(?P<version>\S+)", "version")
                .unwrap()
                .capture("a/9"),
            Some("9")
        );
    }

    #[test]
    fn client_certificate_identity_and_a_version_inside_it() {
        let none = HeaderMap::new();
        let id = Extractor::new(vec![Source::ClientCert { pattern: None }]);
        assert_eq!(
            id.extract_with_cert(&none, None, Some("device-42"))
                .unwrap()
                .raw,
            b"device-42"
        );
        assert!(
            id.extract_with_cert(&none, None, None).is_none(),
            "no certificate: absent"
        );
        assert!(id.extract(&none, None).is_none());
        let version = Extractor::new(vec![Source::ClientCert {
            pattern: Some(Pattern::new(r"/(?P<version>\S+)$", "version").unwrap()),
        }]);
        let f = version
            .extract_with_cert(&none, None, Some("device-42/v3.8.0b3"))
            .unwrap();
        assert_eq!(f.parse_version().unwrap().to_string(), "3.8.0-b3");
        assert!(version
            .extract_with_cert(&none, None, Some("device-42"))
            .is_none());
    }

    #[test]
    fn display_is_bounded_and_clean() {
        let f = Found {
            source: 0,
            raw: b"abc\x01def",
            percent_encoded: false,
        };
        assert_eq!(f.display(5), "abc\u{FFFD}d");
    }

    mod parity {
        use super::*;
        use proptest::prelude::*;

        const NAMES: [&str; 7] = [
            "X-Firmware-Version",
            "x-firmware-version",
            "X-FIRMWARE-VERSION",
            "User-Agent",
            "user-agent",
            "Host",
            "X-Other",
        ];

        fn value() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(
                prop_oneof![
                    8 => 0x20u8..0x7f,
                    1 => Just(b'\t'),
                    1 => 0x80u8..=0xff,
                ],
                0..24,
            )
            .prop_map(|mut v| {
                if v.len() > 3 {
                    v.splice(0..0, b"Airtame/".iter().copied());
                }
                v
            })
        }

        proptest! {
            /// The fast path reads headers from httparse's slice, hyper's path from the
            /// `HeaderMap` hyper builds from that same slice: both must find the same value.
            #[test]
            fn httparse_headers_and_header_map_extract_the_same_value(
                pairs in proptest::collection::vec((0..NAMES.len(), value()), 0..8),
            ) {
                let mut raw = b"GET /?fw=1.2.3 HTTP/1.1\r\n".to_vec();
                for (n, v) in &pairs {
                    raw.extend_from_slice(NAMES[*n].as_bytes());
                    raw.extend_from_slice(b": ");
                    raw.extend_from_slice(v);
                    raw.extend_from_slice(b"\r\n");
                }
                raw.extend_from_slice(b"\r\n");
                let mut slots = [httparse::EMPTY_HEADER; 16];
                let mut req = httparse::Request::new(&mut slots);
                let Ok(httparse::Status::Complete(_)) = req.parse(&raw) else {
                    // hyper would answer 400: neither path extracts anything.
                    return Ok(());
                };
                let parsed: &[httparse::Header<'_>] = req.headers;
                let mut map = HeaderMap::new();
                for h in parsed {
                    map.append(
                        HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                        HeaderValue::from_bytes(h.value).unwrap(),
                    );
                }
                let e = airtame();
                prop_assert_eq!(e.extract(&map, Some("fw=1.2.3")), e.extract(parsed, Some("fw=1.2.3")));
                let no_query = Extractor::new(e.sources()[..2].to_vec());
                prop_assert_eq!(no_query.extract(&map, None), no_query.extract(parsed, None));
            }
        }
    }
}
