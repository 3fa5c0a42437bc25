//! Entry points for the differential fuzz targets in `fuzz/`: the fast path's parsers and
//! rewrites on raw bytes, and hyper's path's rewrite on the same request, so that a target can
//! hold the two paths against each other. Not part of fwgate's API.

use std::mem::MaybeUninit;
use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::super::forward::{rewrite_request_headers, wants_upgrade};
use super::super::ConnInfo;
use super::chunked::ChunkedEnd;
use super::head::{upstream_request_head, RequestShape};
use super::response_head::{parse_response_head, Framing, ResponseParse};

/// How the fast path frames a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    Empty,
    /// This many bytes.
    Length(u64),
    /// Chunked, relayed as is.
    Chunked,
    /// Until the backend closes.
    UntilClose,
}

/// What the fast path makes of a backend's response to a bodiless `GET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseVerdict {
    /// More bytes needed.
    Partial,
    /// A 502.
    Refused,
    /// Relayed: the final status, the body's framing, the bytes the heads took (informational
    /// heads included) and the head the client gets.
    Complete {
        /// Final status.
        status: u16,
        /// Body framing.
        framing: BodyFraming,
        /// Bytes of all heads read.
        consumed: usize,
        /// The rewritten head.
        client_head: Vec<u8>,
    },
}

/// The fast path's reading of `bytes` as a backend's response to a bodiless `GET`, skipping
/// informational heads as it does on the wire.
pub fn response_head(bytes: &[u8]) -> ResponseVerdict {
    let mut at = 0;
    loop {
        match parse_response_head(&bytes[at..], false, false, false) {
            Ok(ResponseParse::Partial) => return ResponseVerdict::Partial,
            Ok(ResponseParse::Informational(n)) => at += n,
            Ok(ResponseParse::Complete(n, status, client_head, framing, _, _)) => {
                return ResponseVerdict::Complete {
                    status,
                    framing: match framing {
                        Framing::Empty => BodyFraming::Empty,
                        Framing::Length(n) => BodyFraming::Length(n),
                        Framing::Chunked => BodyFraming::Chunked,
                        Framing::UntilClose => BodyFraming::UntilClose,
                    },
                    consumed: at + n,
                    client_head,
                }
            }
            Err(_) => return ResponseVerdict::Refused,
        }
    }
}

/// Where the fast path finds the end of a chunked body: `Ok(Some(n))` after `n` bytes,
/// `Ok(None)` when more are needed, `Err(())` when malformed.
#[allow(clippy::result_unit_err)]
pub fn chunked_end(bytes: &[u8]) -> Result<Option<usize>, ()> {
    ChunkedEnd::default().feed(bytes)
}

/// The client both rewrites are made for.
fn client() -> ConnInfo {
    ConnInfo {
        client: SocketAddr::from(([192, 0, 2, 7], 40000)),
        scheme: "http",
        cert_identity: None,
    }
}

/// The backend address both paths use as `Host` when the request has none.
pub const BACKEND_AUTHORITY: &str = "127.0.0.1:9000";

/// The headers the backend gets for the request head `bytes` on each path, as lower-cased
/// names and values in order: `(fast path, hyper's path)`. None when the fast path would not
/// take the request (hyper serves it alone) or hyper would refuse the head.
#[allow(clippy::type_complexity)]
pub fn request_headers(bytes: &[u8]) -> Option<(Vec<(String, Vec<u8>)>, Vec<(String, Vec<u8>)>)> {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); 64];
    let mut req = httparse::Request::new(&mut []);
    if !matches!(
        httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, bytes, &mut slots),
        Ok(httparse::Status::Complete(_))
    ) {
        return None;
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return None;
    };
    if !target.starts_with('/') {
        return None;
    }
    let target = http::uri::PathAndQuery::try_from(target).ok()?;
    let method = http::Method::from_bytes(method.as_bytes()).ok()?;
    let headers: &[httparse::Header<'_>] = req.headers;
    let shape = RequestShape::of(headers)?;
    let upgrade = shape.upgrade.filter(|_| shape.connection_upgrade);
    let info = client();
    let fast = upstream_request_head(
        &method,
        target.as_str(),
        headers,
        &shape,
        upgrade,
        BACKEND_AUTHORITY.as_bytes(),
        &info,
    );
    let fast = reparse(&fast)?;

    let mut map = HeaderMap::new();
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        map.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    let upgrade = wants_upgrade(&map);
    rewrite_request_headers(&mut map, upgrade, None, info.client, info.scheme);
    if !map.contains_key(http::header::HOST) {
        map.insert(
            http::header::HOST,
            HeaderValue::from_static(BACKEND_AUTHORITY),
        );
    }
    let hyper = map
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    Some((fast, hyper))
}

/// The headers of a head the fast path wrote, names lower-cased.
fn reparse(head: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => Some(
            req.headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        ),
        _ => None,
    }
}
