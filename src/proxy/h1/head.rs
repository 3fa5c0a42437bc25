//! The request head as the fast path reads and rewrites it: the headers that decide whether
//! the path takes a request ([`RequestShape`]), the hop-by-hop and forwarding header checks,
//! and the head sent to the backend, rewritten as hyper's path rewrites it.

use super::super::forward::{
    is_connection_option, push_forwarded, push_x_forwarded_for, HOP_BY_HOP,
};
use super::super::ConnInfo;
use crate::extract::is_visible_ascii;

/// The request headers this path cares about, found in one pass.
pub(super) struct RequestShape<'b> {
    /// The first `Upgrade` value.
    pub(super) upgrade: Option<&'b [u8]>,
    /// `Connection` lists `upgrade`.
    pub(super) connection_upgrade: bool,
    /// `Connection` lists `close`.
    pub(super) close: bool,
    /// `Connection` names other headers (to drop as hop-by-hop).
    pub(super) lists_names: bool,
}

impl<'b> RequestShape<'b> {
    /// None when the request has (or may have) a body, or expects `100 Continue`: hyper's
    /// path handles those.
    pub(super) fn of(headers: &[httparse::Header<'b>]) -> Option<RequestShape<'b>> {
        let mut shape = RequestShape {
            upgrade: None,
            connection_upgrade: false,
            close: false,
            lists_names: false,
        };
        let mut content_length_seen = false;
        for h in headers {
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                if content_length_seen || h.value != b"0" {
                    return None;
                }
                content_length_seen = true;
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                || name.eq_ignore_ascii_case("expect")
            {
                return None;
            } else if name.eq_ignore_ascii_case("upgrade") {
                shape.upgrade.get_or_insert(h.value);
            } else if name.eq_ignore_ascii_case("connection") {
                for token in tokens(h.value) {
                    if token.eq_ignore_ascii_case(b"upgrade") {
                        shape.connection_upgrade = true;
                    } else if token.eq_ignore_ascii_case(b"close") {
                        shape.close = true;
                    } else if !is_connection_option(token) {
                        shape.lists_names = true;
                    }
                }
            }
        }
        Some(shape)
    }
}

/// The comma-separated tokens of a header value (none if it is not visible ASCII). Bytes, not
/// `str`: every caller compares them with ASCII names, which needs no UTF-8 check.
pub(super) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let value = if is_visible_ascii(value) { value } else { &[] };
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), dropped on both legs. Most names are ruled out by
/// their length alone.
pub(super) fn is_hop_by_hop(name: &str) -> bool {
    matches!(name.len(), 2 | 7 | 10 | 16 | 17)
        && HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Headers fwgate writes itself for the backend (`X-Forwarded-For`, `Forwarded`,
/// `X-Forwarded-Proto`): the client's are replaced. Ruled out by length first, as above.
pub(super) fn is_forwarding(name: &str) -> bool {
    match name.len() {
        9 => name.eq_ignore_ascii_case("forwarded"),
        15 => name.eq_ignore_ascii_case("x-forwarded-for"),
        17 => name.eq_ignore_ascii_case("x-forwarded-proto"),
        _ => false,
    }
}

/// Whether `name` is listed in a `Connection` header, as hyper's path treats it.
pub(super) fn listed_in_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| tokens(h.value))
        .filter(|t| !is_connection_option(t))
        .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
}

/// Header names with `_` are dropped, as nginx does by default: CGI-style backends fold
/// `X_Firmware_Version` and `X-Firmware-Version` into one variable, and fwgate reads only the
/// latter.
pub(crate) fn has_underscore(name: &str) -> bool {
    name.as_bytes().contains(&b'_')
}

/// The request head for the backend: the same rewrite as hyper's path (hop-by-hop removed,
/// `Upgrade` kept with `Connection: upgrade`, `Host` kept or set to the backend's address,
/// `X-Forwarded-For`/`Forwarded` appended, `X-Forwarded-Proto` set), in one buffer.
pub(super) fn upstream_request_head(
    method: &http::Method,
    target: &str,
    headers: &[httparse::Header<'_>],
    shape: &RequestShape<'_>,
    upgrade: Option<&[u8]>,
    authority: &[u8],
    info: &ConnInfo,
) -> Vec<u8> {
    let lists_names = shape.lists_names;
    let mut out = Vec::with_capacity(
        256 + headers
            .iter()
            .map(|h| h.name.len() + h.value.len() + 4)
            .sum::<usize>(),
    );
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // As hyper's path: a header named in `Connection` is dropped, `Host` too (the backend's
    // address replaces it), and so are the client's forwarding headers (this hop's only).
    let dropped = |name: &str| lists_names && listed_in_connection(headers, name);
    let mut host_kept = false;
    for h in headers {
        let name = h.name;
        if is_hop_by_hop(name) || is_forwarding(name) || has_underscore(name) || dropped(name) {
            continue;
        }
        host_kept |= name.len() == 4 && name.eq_ignore_ascii_case("host");
        push_header(&mut out, name.as_bytes(), h.value);
    }
    if !host_kept {
        push_header(&mut out, b"host", authority);
    }
    if let Some(upgrade) = upgrade {
        push_header(&mut out, b"upgrade", upgrade);
        push_header(&mut out, b"connection", b"upgrade");
    }
    // Written straight into the head: no intermediate strings.
    let named = |name: &'static str| {
        let gone = dropped(name);
        headers
            .iter()
            .filter(move |h| !gone && h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    out.extend_from_slice(b"x-forwarded-for: ");
    push_x_forwarded_for(&mut out, named("x-forwarded-for"), info.client);
    out.extend_from_slice(b"\r\nforwarded: ");
    let host = named("host").next().filter(|_| host_kept);
    push_forwarded(&mut out, named("forwarded"), host, info.client, info.scheme);
    out.extend_from_slice(b"\r\n");
    push_header(&mut out, b"x-forwarded-proto", info.scheme.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_name_checks_find_every_listed_name_in_any_case_and_nothing_else() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
            assert!(is_hop_by_hop(&name.to_ascii_uppercase()), "{name}");
            assert!(!is_forwarding(name), "{name}");
        }
        for name in ["forwarded", "X-Forwarded-For", "x-forwarded-PROTO"] {
            assert!(is_forwarding(name), "{name}");
            assert!(!is_hop_by_hop(name), "{name}");
        }
        for name in [
            "host",
            "x-device-id",
            "te2",
            "upgrades",
            "connections",
            "x-forwarded",
        ] {
            assert!(!is_hop_by_hop(name) && !is_forwarding(name), "{name}");
        }
    }
}
