//! fwgate's own answers on the fast path (refusals, backend failures), serialised as hyper's
//! server writes them, and the cached `Date` header.

use http::{Response, StatusCode};

use super::super::response::{Answer, ResponseBody, TEXT_PLAIN, UPGRADE_REQUIRED_PROTOCOL};
use super::head::push_header;

/// Serialises a response fwgate itself made (a backend failure; always a fixed body) the way
/// hyper's server writes it.
pub(super) fn encode_response(resp: &Response<ResponseBody>, close: bool) -> Vec<u8> {
    let body = resp.body().fixed_bytes().unwrap_or_default();
    let mut out = Vec::with_capacity(160 + body.len());
    push_status_line(&mut out, resp.status());
    for (name, value) in resp.headers() {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    finish_fixed(&mut out, body, close);
    out
}

/// Serialises fwgate's own answer (a refusal) as hyper's path sends it, without building a
/// `Response`: a refusal storm costs as little as possible.
pub(super) fn encode_answer(answer: &Answer, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + answer.body.len());
    push_status_line(&mut out, answer.status);
    push_header(&mut out, b"content-type", TEXT_PLAIN.as_bytes());
    if let Some(secs) = answer.retry_after {
        let mut digits = itoa::Buffer::new();
        push_header(&mut out, b"retry-after", digits.format(secs).as_bytes());
    }
    if answer.status == StatusCode::UPGRADE_REQUIRED {
        push_header(&mut out, b"upgrade", UPGRADE_REQUIRED_PROTOCOL.as_bytes());
        push_header(&mut out, b"connection", b"upgrade");
    }
    finish_fixed(&mut out, &answer.body, close);
    out
}

fn push_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The end of a fixed-body response: length, `Connection: close` when closing, `Date`, the
/// blank line and the body.
fn finish_fixed(out: &mut Vec<u8>, body: &[u8], close: bool) {
    push_header(
        out,
        b"content-length",
        itoa::Buffer::new().format(body.len()).as_bytes(),
    );
    if close {
        push_header(out, b"connection", b"close");
    }
    push_date(out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Appends `date: <IMF-fixdate>`, formatted once per second per thread (as hyper caches it).
pub(super) fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            *cached = (secs, httpdate::fmt_http_date(now));
        }
        push_header(out, b"date", cached.1.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_responses_are_written_as_hyper_writes_them() {
        let resp = crate::proxy::response::plain(StatusCode::BAD_GATEWAY, "backend unreachable\n");
        let text = String::from_utf8(encode_response(&resp, true)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "backend unreachable\n");
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("HTTP/1.1 502 Bad Gateway"));
        let mut rest: Vec<&str> = lines.filter(|l| !l.starts_with("date: ")).collect();
        rest.sort();
        assert_eq!(
            rest,
            [
                "connection: close",
                "content-length: 20",
                "content-type: text/plain; charset=utf-8"
            ]
        );
        assert!(head.contains("\r\ndate: "));
    }
}
