//! The backend's response head on the fast path: read (informational heads skipped), parsed
//! with httparse, its body framing found (RFC 9112 §6.3), and rewritten for the client as
//! hyper's path would send it.

use std::mem::MaybeUninit;

use http::StatusCode;
use tokio::io::AsyncReadExt as _;

use super::super::forward::{is_connection_option, parse_content_length, UpstreamStream};
use super::super::response::ProxyFailure;
use super::super::tunnel::Protocol;
use super::encode::push_date;
use super::head::{is_hop_by_hop, listed_in_connection, push_header, tokens};
use crate::extract::visible_ascii;

/// hyper's client accepts 100 response headers; so does this path.
const RESPONSE_HEADER_SLOTS: usize = 100;
/// Longest backend response head accepted before answering 502: hyper's client limit, so a
/// backend's head is accepted by both paths alike.
const MAX_RESPONSE_HEAD: usize = 8192 + 4096 * 100;

/// A backend response head, rewritten for the client.
pub(super) struct BackendHead {
    pub(super) status: u16,
    /// The head as the client gets it.
    pub(super) client_head: Vec<u8>,
    pub(super) framing: Framing,
    /// Bytes the backend sent after its head.
    pub(super) rest: Vec<u8>,
    /// The backend keeps the connection open after this response.
    pub(super) backend_keep_alive: bool,
    /// The client connection closes after this response (it said `Connection: close`, or
    /// the body ends only when the backend closes).
    pub(super) client_close: bool,
    /// What a 101 switched to (its `Upgrade` header).
    pub(super) protocol: Protocol,
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body (101, 204, 304, a response to HEAD).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked: relayed as is, its end found by [`ChunkedEnd`].
    Chunked,
    /// Until the backend closes.
    UntilClose,
}

/// Reads the backend's response head, skipping informational (1xx other than 101) ones as
/// hyper's client does.
pub(super) async fn read_response_head(
    upstream: &mut UpstreamStream,
    upgrade: bool,
    head_request: bool,
    client_close: bool,
) -> Result<BackendHead, HeadError> {
    let mut buf = vec![0u8; 1024];
    let mut filled = 0;
    let mut received = false;
    loop {
        if filled > 0 {
            match parse_response_head(&buf[..filled], upgrade, head_request, client_close)
                .map_err(HeadError::Failed)?
            {
                ResponseParse::Partial => {}
                ResponseParse::Informational(n) => {
                    buf.copy_within(n..filled, 0);
                    filled -= n;
                    continue;
                }
                ResponseParse::Complete(n, status, client_head, framing, keep_alive, protocol) => {
                    return Ok(BackendHead {
                        status,
                        client_head,
                        framing,
                        rest: buf[n..filled].to_vec(),
                        backend_keep_alive: keep_alive,
                        client_close: status != 101
                            && (client_close || framing == Framing::UntilClose),
                        protocol,
                    })
                }
            }
            if filled == buf.len() {
                if buf.len() >= MAX_RESPONSE_HEAD {
                    return Err(HeadError::Failed(ProxyFailure::UpstreamBroken));
                }
                buf.resize((buf.len() * 2).min(MAX_RESPONSE_HEAD), 0);
            }
        }
        match upstream.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) if !received => return Err(HeadError::Silent),
            Ok(0) | Err(_) => return Err(HeadError::Failed(ProxyFailure::UpstreamBroken)),
            Ok(n) => {
                filled += n;
                received = true;
            }
        }
    }
}

/// Why no response head arrived.
pub(super) enum HeadError {
    /// The connection ended before any byte of a response: a pooled connection the backend
    /// had closed, safe to retry elsewhere for an idempotent request.
    Silent,
    /// Anything else.
    Failed(ProxyFailure),
}

impl From<HeadError> for ProxyFailure {
    fn from(e: HeadError) -> ProxyFailure {
        match e {
            HeadError::Silent => ProxyFailure::UpstreamBroken,
            HeadError::Failed(f) => f,
        }
    }
}

pub(super) enum ResponseParse {
    Partial,
    /// An informational head of this length, to skip.
    Informational(usize),
    /// Head length, status, the head for the client, the body's framing, whether the
    /// backend keeps the connection open after it, and what a 101 switched to.
    Complete(usize, u16, Vec<u8>, Framing, bool, Protocol),
}

/// Parses a response head and rewrites it for the client: hop-by-hop headers removed (the
/// framing header kept when the body is relayed chunked), `Upgrade`/`Connection: upgrade`
/// kept on a 101, `Date` added when missing, `Connection: close` when this path closes after.
pub(super) fn parse_response_head(
    bytes: &[u8],
    upgrade: bool,
    head_request: bool,
    client_close: bool,
) -> Result<ResponseParse, ProxyFailure> {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); RESPONSE_HEADER_SLOTS];
    let mut resp = httparse::Response::new(&mut []);
    let n = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, bytes, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(ResponseParse::Partial),
        Err(_) => return Err(ProxyFailure::UpstreamBroken),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(ProxyFailure::UpstreamBroken);
    };
    // httparse reads any three digits; hyper's client takes 100-999 only.
    if status < 100 {
        return Err(ProxyFailure::UpstreamBroken);
    }
    if status == 101 && !upgrade {
        return Err(ProxyFailure::UpstreamBroken);
    }
    if (100..200).contains(&status) && status != 101 {
        return Ok(ResponseParse::Informational(n));
    }
    let headers: &[httparse::Header<'_>] = resp.headers;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut has_date = false;
    let mut backend_close = version == 0;
    let mut lists_names = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides; several headers read as one list.
            transfer_encoding = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let len = parse_content_length(h.value).ok_or(ProxyFailure::UpstreamBroken)?;
            if content_length.is_some_and(|l| l != len) {
                return Err(ProxyFailure::UpstreamBroken);
            }
            content_length = Some(len);
        } else if h.name.eq_ignore_ascii_case("date") {
            has_date = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    backend_close = true;
                } else if !is_connection_option(token) {
                    lists_names = true;
                }
            }
        }
    }
    // HTTP/1.0 has no transfer codings: hyper's client refuses such a response.
    if version == 0 && transfer_encoding.is_some() {
        return Err(ProxyFailure::UpstreamBroken);
    }
    let framing = if status == 101 || head_request || status == 204 || status == 304 {
        Framing::Empty
    } else if let Some(te) = transfer_encoding {
        if ends_with_chunked(te) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(len) = content_length {
        Framing::Length(len)
    } else {
        Framing::UntilClose
    };
    let mut out = Vec::with_capacity(n + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    let reason = resp.reason.filter(|r| !r.is_empty()).or_else(|| {
        StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
    });
    out.extend_from_slice(reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut upgrade_value = None;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_value.get_or_insert(h.value);
        }
        // The header that frames the relayed body stays, even if `Connection` names it: the
        // client needs it to find the end (hyper's path writes its own framing header).
        let framing_header = match framing {
            Framing::Chunked => name.eq_ignore_ascii_case("transfer-encoding"),
            Framing::Length(_) => name.eq_ignore_ascii_case("content-length"),
            _ => false,
        };
        if !framing_header
            && (is_hop_by_hop(name)
                || (transfer_encoding.is_some() && name.eq_ignore_ascii_case("content-length"))
                || (lists_names && listed_in_connection(headers, name)))
        {
            continue;
        }
        push_header(&mut out, name.as_bytes(), h.value);
    }
    if !has_date {
        push_date(&mut out);
    }
    if status == 101 {
        if let Some(u) = upgrade_value {
            push_header(&mut out, b"upgrade", u);
        }
        push_header(&mut out, b"connection", b"upgrade");
    } else if client_close || framing == Framing::UntilClose {
        push_header(&mut out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    let keep_alive = !backend_close && framing != Framing::UntilClose;
    let protocol = Protocol::of_upgrade(upgrade_value.filter(|_| status == 101));
    Ok(ResponseParse::Complete(
        n, status, out, framing, keep_alive, protocol,
    ))
}

/// Whether the last transfer coding is `chunked`, read as hyper reads it: the text after the
/// last comma, so `chunked,` is not chunked.
fn ends_with_chunked(value: &[u8]) -> bool {
    visible_ascii(value)
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8], upgrade: bool, head: bool) -> (usize, u16, String, Framing) {
        match parse_response_head(bytes, upgrade, head, true) {
            Ok(ResponseParse::Complete(n, s, h, f, _, _)) => {
                (n, s, String::from_utf8(h).unwrap(), f)
            }
            other => panic!("not complete: {:?}", other.is_ok()),
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |r: &[u8]| complete(r, true, false).3;
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            Framing::Length(12)
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n"),
            Framing::Length(7)
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Framing::UntilClose
        );
        assert_eq!(f(b"HTTP/1.1 200 OK\r\n\r\n"), Framing::UntilClose);
        assert_eq!(
            f(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(f(b"HTTP/1.1 304 Not Modified\r\n\r\n"), Framing::Empty);
        assert_eq!(
            f(b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(
            complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true, true).3,
            Framing::Empty
        );
        // Chunked keeps its framing header and drops a contradicting length.
        let (_, _, head, _) = complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            true,
            false,
        );
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
        assert!(!head.contains("Content-Length"), "{head}");
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
    }

    #[test]
    fn bad_or_unexpected_backend_heads_are_502s_and_1xx_are_skipped() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_response_head(bad, true, false, true),
                    Err(ProxyFailure::UpstreamBroken)
                ),
                "{bad:?}"
            );
        }
        // A 101 nobody asked for.
        assert!(parse_response_head(b"HTTP/1.1 101 S\r\n\r\n", false, false, true).is_err());
        assert!(matches!(
            parse_response_head(
                b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1",
                true,
                false,
                true
            ),
            Ok(ResponseParse::Informational(37))
        ));
        assert!(matches!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nA: b", true, false, true),
            Ok(ResponseParse::Partial)
        ));
    }

    /// What differential fuzzing against hyper's client found: these heads are refused or
    /// framed as hyper frames them.
    #[test]
    fn heads_hyper_refuses_are_502s_and_framing_is_read_as_hyper_reads_it() {
        for bad in [
            &b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                parse_response_head(bad, false, false, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let f = |r: &[u8]| complete(r, false, false);
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551613\r\n\r\n").3,
            Framing::Length(u64::MAX - 2)
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nContent-Length: 007\r\n\r\n").3,
            Framing::Length(7)
        );
        assert_eq!(
            f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n").3,
            Framing::UntilClose
        );
        // Connection cannot take away the header that frames the body.
        for (input, kept) in [
            (
                &b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n"[..],
                "Content-Length: 5\r\n",
            ),
            (
                b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding, x-a\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
                "Transfer-Encoding: chunked\r\n",
            ),
        ] {
            let (_, _, head, _) = f(input);
            assert!(head.contains(kept), "{head}");
            assert!(!head.contains("X-A"), "{head}");
        }
    }

    #[test]
    fn a_101_keeps_upgrade_and_the_reason_phrase_survives() {
        let input: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade, X-Hop\r\nX-Hop: 1\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: abc\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\n\r\nDATA";
        let (n, status, head, _) = complete(input, true, false);
        assert_eq!((n, status), (input.len() - 4, 101));
        assert_eq!(
            head,
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc\r\nDate: Tue, 24 Nov 2026 10:00:00 GMT\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        );
        let (_, _, head, _) = complete(b"HTTP/1.1 418 \r\nContent-Length: 0\r\n\r\n", true, false);
        assert!(head.starts_with("HTTP/1.1 418 I'm a teapot\r\n"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
    }

    mod properties {
        use super::*;
        use crate::proxy::h1::chunked::ChunkedEnd;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic_the_parsers(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                let _ = ChunkedEnd::default().feed(&bytes);
                for (upgrade, head, close) in [(true, false, true), (false, true, false)] {
                    let _ = parse_response_head(&bytes, upgrade, head, close);
                }
                let mut prefixed = b"HTTP/1.1 200 OK\r\n".to_vec();
                prefixed.extend_from_slice(&bytes);
                let _ = parse_response_head(&prefixed, false, false, false);
            }

            #[test]
            fn a_forwarded_response_head_reparses_with_the_same_status_and_framing(
                status in 200u16..600,
                length in proptest::option::of(0u64..100_000),
                chunked in any::<bool>(),
                extra in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,20}"), 0..6),
            ) {
                let mut head = format!("HTTP/1.1 {status} X\r\n");
                if let Some(l) = length {
                    head.push_str(&format!("Content-Length: {l}\r\n"));
                }
                if chunked {
                    head.push_str("Transfer-Encoding: chunked\r\n");
                }
                for (k, v) in &extra {
                    head.push_str(&format!("{k}: {}\r\n", v.trim()));
                }
                head.push_str("\r\n");
                let first = parse_response_head(head.as_bytes(), false, false, false);
                let Ok(ResponseParse::Complete(_, s1, out, f1, _, _)) = first else {
                    // Only a random header colliding with framing can make it unusable.
                    return Ok(());
                };
                let Ok(ResponseParse::Complete(n2, s2, _, f2, _, _)) =
                    parse_response_head(&out, false, false, false)
                else {
                    return Err(TestCaseError::fail(format!("rewritten head does not parse: {:?}", String::from_utf8_lossy(&out))));
                };
                prop_assert_eq!(n2, out.len());
                prop_assert_eq!((s1, f1), (s2, f2));
            }
        }
    }
}
