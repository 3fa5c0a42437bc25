//! Where a device's firmware version (and device id) comes from: an ordered list of sources
//! (a header, a header with a regex capture, a query parameter); the first that yields a value
//! is decided on. Extraction borrows from the request and allocates nothing.
//!
//! **One value or none.** The backend must never read a version other than the one fwgate
//! decided on, so a request is [`Extracted::Ambiguous`] (answered 400, never decided) when a
//! source is repeated with different values (two `X-Firmware-Version` lines, an empty one and
//! a real one, `?fw=&fw=3.8.0-b3`), or when two sources both yield a value and disagree (the
//! header says 3.7.2, the query 3.8.0-b3). Values agree when they are the same version (in
//! the rules' ordering) or the same text. Query keys match after percent-decoding, ignoring
//! ASCII case (`f%77`, `FW`), as backends differ on both.

use http::header::{HeaderMap, HeaderName};
use regex::Regex;

use crate::version::{FirmwareVersion, ParseError, VersionOrdering, MAX_VERSION_LEN};

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

/// What the sources say about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extracted<'a> {
    /// No source yielded a value.
    Missing,
    /// The value to decide on; every other source that yields a value agrees with it.
    Found(Found<'a>),
    /// Repeated or conflicting values: refuse rather than pick one.
    Ambiguous(Ambiguity),
}

impl<'a> Extracted<'a> {
    /// The value to decide on, if there is exactly one.
    pub fn found(&self) -> Option<&Found<'a>> {
        match self {
            Extracted::Found(f) => Some(f),
            _ => None,
        }
    }
}

/// Why a request's value is ambiguous (source indexes into [`Extractor::sources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// The source appears more than once with different values.
    Repeated {
        /// The source.
        source: usize,
    },
    /// Two sources yield values that disagree.
    Conflicting {
        /// The source decided on first.
        first: usize,
        /// The later source that disagrees.
        second: usize,
    },
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

/// A query value or key percent-decoded (`+` kept), lossy: for operator input on the admin
/// API, not for decisions.
pub fn percent_decode(text: &str) -> String {
    let mut out = vec![0u8; text.len()];
    match percent_decode_into(text.as_bytes(), &mut out) {
        Some(n) => String::from_utf8_lossy(&out[..n]).into_owned(),
        None => text.to_string(),
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

impl Found<'_> {
    /// Whether `other` says the same: the same version in `ordering`, or the same text.
    fn agrees_with(&self, other: &Found<'_>, ordering: VersionOrdering) -> bool {
        match (self.parse_version(), other.parse_version()) {
            (Ok(a), Ok(b)) => a.canonical(ordering) == b.canonical(ordering),
            _ => same_text(
                self.raw,
                self.percent_encoded,
                other.raw,
                other.percent_encoded,
            ),
        }
    }
}

/// Whether two raw values are the same text once trimmed and (where encoded) decoded.
fn same_text(a: &[u8], a_encoded: bool, b: &[u8], b_encoded: bool) -> bool {
    let mut a_buf = [0u8; MAX_COMPARED_VALUE];
    let mut b_buf = [0u8; MAX_COMPARED_VALUE];
    let decoded =
        |raw: &[u8], encoded: bool, buf: &mut [u8; MAX_COMPARED_VALUE]| -> Option<usize> {
            let raw = raw.trim_ascii();
            if encoded && raw.contains(&b'%') {
                percent_decode_into(raw, buf)
            } else {
                let n = raw.len();
                buf.get_mut(..n)?.copy_from_slice(raw);
                Some(n)
            }
        };
    match (
        decoded(a, a_encoded, &mut a_buf),
        decoded(b, b_encoded, &mut b_buf),
    ) {
        (Some(x), Some(y)) => a_buf[..x].trim_ascii() == b_buf[..y].trim_ascii(),
        // Too long (or badly encoded) to decode here: only identical bytes agree.
        _ => a.trim_ascii() == b.trim_ascii(),
    }
}

/// Longest value compared after decoding (longer values compare as raw bytes).
const MAX_COMPARED_VALUE: usize = 512;

/// Where request headers are looked up: hyper's `HeaderMap`, or the raw head that the
/// HTTP/1.1 fast path parsed without building one. Both give the same answers.
pub trait HeaderSource {
    /// The first value of `name`, as bytes on the wire.
    fn value(&self, name: &HeaderName) -> Option<&[u8]>;
    /// Every value of `name`, in order.
    fn values(&self, name: &HeaderName) -> Vec<&[u8]>;
    /// Calls `visit` with every value of `name`, in order, until it returns false.
    fn each_value<'a>(&'a self, name: &HeaderName, visit: impl FnMut(&'a [u8]) -> bool);
}

impl HeaderSource for HeaderMap {
    fn value(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }

    fn values(&self, name: &HeaderName) -> Vec<&[u8]> {
        self.get_all(name).iter().map(|v| v.as_bytes()).collect()
    }

    fn each_value<'a>(&'a self, name: &HeaderName, mut visit: impl FnMut(&'a [u8]) -> bool) {
        for v in self.get_all(name) {
            if !visit(v.as_bytes()) {
                return;
            }
        }
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

    fn each_value<'a>(&'a self, name: &HeaderName, mut visit: impl FnMut(&'a [u8]) -> bool) {
        let name = name.as_str();
        for h in self {
            if h.name.eq_ignore_ascii_case(name) && !visit(h.value) {
                return;
            }
        }
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

    /// The value to decide on (see the module docs): the first source that yields a
    /// non-empty value, provided no source is repeated with different values and every other
    /// source that yields a value agrees with it (compared as versions in `ordering`).
    pub fn extract<'a, H: HeaderSource + ?Sized>(
        &self,
        headers: &'a H,
        query: Option<&'a str>,
        cert_identity: Option<&'a str>,
        ordering: VersionOrdering,
    ) -> Extracted<'a> {
        let mut decided: Option<Found<'a>> = None;
        for (index, source) in self.sources.iter().enumerate() {
            let found = match find(source, headers, query, cert_identity) {
                SourceValue::Absent => continue,
                SourceValue::Repeated => {
                    return Extracted::Ambiguous(Ambiguity::Repeated { source: index })
                }
                SourceValue::Value(raw, percent_encoded) => Found {
                    source: index,
                    raw,
                    percent_encoded,
                },
            };
            match &decided {
                None => decided = Some(found),
                Some(first) if first.agrees_with(&found, ordering) => {}
                Some(first) => {
                    return Extracted::Ambiguous(Ambiguity::Conflicting {
                        first: first.source,
                        second: index,
                    })
                }
            }
        }
        decided.map_or(Extracted::Missing, Extracted::Found)
    }

    /// Why a request was ambiguous, for its 400 answer and the log.
    pub fn explain(&self, ambiguity: Ambiguity) -> String {
        let name = |i: usize| {
            self.sources
                .get(i)
                .map_or_else(|| format!("source {i}"), Source::describe)
        };
        match ambiguity {
            Ambiguity::Repeated { source } => {
                format!(
                    "{} is sent more than once with different values",
                    name(source)
                )
            }
            Ambiguity::Conflicting { first, second } => {
                format!("{} and {} disagree", name(first), name(second))
            }
        }
    }
}

/// What one source holds in a request.
enum SourceValue<'a> {
    /// Nothing, or only empty values.
    Absent,
    /// One value (repeats, if any, are identical): raw bytes, and whether percent-encoded.
    Value(&'a [u8], bool),
    /// Repeated with different values (an empty one next to a real one counts).
    Repeated,
}

/// Folds the occurrences of one source: the first one's raw value, unless another differs.
struct Occurrences<'a> {
    first: Option<Option<&'a [u8]>>,
    encoded: bool,
    differs: bool,
}

impl<'a> Occurrences<'a> {
    fn new(encoded: bool) -> Occurrences<'a> {
        Occurrences {
            first: None,
            encoded,
            differs: false,
        }
    }

    /// Adds one occurrence (None: a header line whose pattern does not match); false once
    /// two differ, to stop looking.
    fn add(&mut self, value: Option<&'a [u8]>) -> bool {
        let value = value.map(|v| {
            if v.trim_ascii().is_empty() {
                &v[..0]
            } else {
                v
            }
        });
        match self.first {
            None => {
                self.first = Some(value);
                true
            }
            Some(first) => {
                let same = match (first, value) {
                    (Some(a), Some(b)) => same_text(a, self.encoded, b, self.encoded),
                    (None, None) => true,
                    _ => false,
                };
                self.differs |= !same;
                same
            }
        }
    }

    fn finish(self) -> SourceValue<'a> {
        match self.first {
            _ if self.differs => SourceValue::Repeated,
            Some(Some(v)) if !v.is_empty() => SourceValue::Value(v, self.encoded),
            _ => SourceValue::Absent,
        }
    }
}

fn find<'a, H: HeaderSource + ?Sized>(
    source: &Source,
    headers: &'a H,
    query: Option<&'a str>,
    cert_identity: Option<&'a str>,
) -> SourceValue<'a> {
    match source {
        Source::Header { name, pattern } => {
            let mut seen = Occurrences::new(false);
            headers.each_value(name, |value| {
                seen.add(match pattern {
                    None => Some(value),
                    Some(p) => visible_ascii(value)
                        .and_then(|text| p.capture(text))
                        .map(str::as_bytes),
                })
            });
            seen.finish()
        }
        Source::Query { name } => {
            let mut seen = Occurrences::new(true);
            for pair in query.unwrap_or("").split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if query_key_is(k.as_bytes(), name.as_bytes()) && !seen.add(Some(v.as_bytes())) {
                    break;
                }
            }
            seen.finish()
        }
        Source::ClientCert { pattern } => {
            let mut seen = Occurrences::new(false);
            if let Some(identity) = cert_identity {
                seen.add(match pattern {
                    None => Some(identity.as_bytes()),
                    Some(p) => p.capture(identity).map(str::as_bytes),
                });
            }
            seen.finish()
        }
    }
}

/// Whether a raw query key is `name` once percent-decoded, ignoring ASCII case (`f%77`, `FW`).
fn query_key_is(raw: &[u8], name: &[u8]) -> bool {
    if !raw.contains(&b'%') {
        return raw.eq_ignore_ascii_case(name);
    }
    let mut buf = [0u8; 64];
    match percent_decode_into(raw, &mut buf) {
        Some(n) => buf[..n].eq_ignore_ascii_case(name),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const FIRMWARE: VersionOrdering = VersionOrdering::Firmware;

    /// The value decided on, if exactly one.
    fn pick<'a, H: HeaderSource + ?Sized>(
        e: &Extractor,
        headers: &'a H,
        query: Option<&'a str>,
    ) -> Option<Found<'a>> {
        e.extract(headers, query, None, FIRMWARE).found().copied()
    }

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
    fn the_first_yielding_source_is_decided_on_when_the_others_agree_or_are_absent() {
        let e = airtame();
        let h = headers(&[
            ("x-firmware-version", "2.0.0"),
            ("user-agent", "Airtame/v2.0"),
        ]);
        let f = pick(&e, &h, Some("fw=2.0.0%2Bbuild.1")).unwrap();
        assert_eq!((f.source, f.raw), (0, &b"2.0.0"[..]));

        let h = headers(&[("user-agent", "Airtame/3.8.0-b3 (linux)")]);
        let f = pick(&e, &h, Some("fw=3.8.0-B03")).unwrap();
        assert_eq!((f.source, f.raw), (1, &b"3.8.0-b3"[..]));

        let h = headers(&[("user-agent", "curl/8")]);
        let f = pick(&e, &h, Some("a=1&fw=v3.9&b")).unwrap();
        assert_eq!((f.source, f.raw), (2, &b"v3.9"[..]));

        assert!(pick(&e, &h, Some("fwx=1")).is_none());
        assert!(pick(&e, &HeaderMap::new(), None).is_none());
    }

    #[test]
    fn repeated_or_conflicting_values_are_ambiguous() {
        let e = airtame();
        let extract = |h: &HeaderMap, q: Option<&'static str>| {
            let found = e.extract(h, q, None, FIRMWARE);
            match found {
                Extracted::Ambiguous(why) => Some((why, e.explain(why))),
                _ => None,
            }
        };
        let repeated = Ambiguity::Repeated { source: 0 };
        for pair in [("3.7.2", "3.8.0-b3"), ("", "3.8.0-b3"), ("3.8.0-b3", " ")] {
            let h = headers(&[
                ("x-firmware-version", pair.0),
                ("x-firmware-version", pair.1),
            ]);
            let (why, text) = extract(&h, None).unwrap_or_else(|| panic!("{pair:?}"));
            assert_eq!(why, repeated, "{pair:?}");
            assert_eq!(
                text,
                "header x-firmware-version is sent more than once with different values"
            );
        }
        // The same value twice is one value.
        let h = headers(&[
            ("x-firmware-version", "3.7.2"),
            ("x-firmware-version", "3.7.2 "),
        ]);
        assert_eq!(pick(&e, &h, None).unwrap().raw, b"3.7.2");
        // Query: repeats, empty then real, and keys spelled differently.
        let none = HeaderMap::new();
        for q in [
            "fw=&fw=3.8.0-b3",
            "fw=3.7.2&FW=3.8.0-b3",
            "fw=3.7.2&f%77=3.8.0-b3",
            "fw=3.7.2&fw",
        ] {
            assert_eq!(
                extract(&none, Some(q)).map(|x| x.0),
                Some(Ambiguity::Repeated { source: 2 }),
                "{q}"
            );
        }
        assert_eq!(
            pick(&e, &none, Some("f%77=3.8.0-b3")).unwrap().raw,
            b"3.8.0-b3"
        );
        assert_eq!(
            pick(&e, &none, Some("Fw=3.8.0-b3&fw=3.8.0%2Db3"))
                .unwrap()
                .raw,
            b"3.8.0-b3"
        );
        // Two sources that disagree.
        let h = headers(&[("x-firmware-version", "3.7.2")]);
        let (why, text) = extract(&h, Some("fw=3.8.0-b3")).unwrap();
        assert_eq!(
            why,
            Ambiguity::Conflicting {
                first: 0,
                second: 2
            }
        );
        assert_eq!(text, "header x-firmware-version and query fw disagree");
        let h = headers(&[
            ("x-firmware-version", "3.7.2"),
            ("user-agent", "Airtame/banana"),
        ]);
        assert!(
            extract(&h, None).is_some(),
            "an unparseable second value disagrees too"
        );
    }

    #[test]
    fn empty_values_are_absent() {
        let e = airtame();
        let h = headers(&[("x-firmware-version", "  ")]);
        assert!(pick(&e, &h, Some("fw=")).is_none());
    }

    #[test]
    fn query_values_are_percent_decoded() {
        let e = airtame();
        let none = HeaderMap::new();
        let f = pick(&e, &none, Some("fw=3.8.0%2Bbuild.5")).unwrap();
        let v = f.parse_version().unwrap();
        assert_eq!(v.to_string(), "3.8.0");
        let f = pick(&e, &none, Some("fw=3.8.0-b3")).unwrap();
        assert_eq!(f.parse_version().unwrap().to_string(), "3.8.0-b3");
        let f = pick(&e, &none, Some("fw=%zz")).unwrap();
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
            id.extract(&none, None, Some("device-42"), FIRMWARE)
                .found()
                .copied()
                .unwrap()
                .raw,
            b"device-42"
        );
        assert!(
            id.extract(&none, None, None, FIRMWARE)
                .found()
                .copied()
                .is_none(),
            "no certificate: absent"
        );
        assert!(pick(&id, &none, None).is_none());
        let version = Extractor::new(vec![Source::ClientCert {
            pattern: Some(Pattern::new(r"/(?P<version>\S+)$", "version").unwrap()),
        }]);
        let f = version
            .extract(&none, None, Some("device-42/v3.8.0b3"), FIRMWARE)
            .found()
            .copied()
            .unwrap();
        assert_eq!(f.parse_version().unwrap().to_string(), "3.8.0-b3");
        assert!(version
            .extract(&none, None, Some("device-42"), FIRMWARE)
            .found()
            .copied()
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
                prop_assert_eq!(pick(&e, &map, Some("fw=1.2.3")), pick(&e, parsed, Some("fw=1.2.3")));
                let no_query = Extractor::new(e.sources()[..2].to_vec());
                prop_assert_eq!(pick(&no_query, &map, None), pick(&no_query, parsed, None));
            }
        }
    }
}
