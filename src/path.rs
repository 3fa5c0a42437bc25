//! Request paths as rules see them and as the backend gets them: one spelling per path, so
//! nobody reaches a path a `path_prefix` rule guards by writing it differently (`//ws`,
//! `/./ws`, `/x/../ws`, `/%77s`).
//!
//! [`normalize`] applies, in order: percent-decoding of unreserved characters (RFC 3986
//! §2.3: letters, digits, `-`, `.`, `_`, `~`), with the hex digits of the escapes that stay
//! upper-cased (§6.2.2.1) and a stray `%` written as `%25`; merging of repeated slashes (as nginx's `merge_slashes`); removal
//! of `.` and `..` segments (§5.2.4). Reserved escapes such as `%2F` stay encoded: they are
//! data, not structure. The result is idempotent, and a path already in that form is
//! returned as is without allocating (the common case).

use std::borrow::Cow;

/// The normalised form of an origin-form path (`/...`, no query). Anything that does not
/// start with `/` (`*`) is returned unchanged.
pub fn normalize(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') || is_normal(path.as_bytes()) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path.as_bytes());
    let merged = merge_slashes(&decoded);
    let clean = remove_dot_segments(&merged);
    match String::from_utf8(clean) {
        Ok(s) => Cow::Owned(s),
        // Only ASCII escapes are decoded, so valid UTF-8 in stays valid out; never panic.
        Err(_) => Cow::Borrowed(path),
    }
}

/// No escape, no `//`, no `.` or `..` segment: nothing to do.
fn is_normal(bytes: &[u8]) -> bool {
    if bytes.contains(&b'%') || bytes.windows(2).any(|w| w == b"//") {
        return false;
    }
    !bytes
        .split(|&b| b == b'/')
        .any(|segment| segment == b"." || segment == b"..")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn decode_unreserved(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                let value = hi * 16 + lo;
                if is_unreserved(value) {
                    out.push(value);
                } else {
                    out.push(b'%');
                    out.push(bytes[i + 1].to_ascii_uppercase());
                    out.push(bytes[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
            // A stray `%` is written as the escape it means, so it can never pair up with
            // characters decoded after it into a new escape (`%%61` is not `%a`).
            out.extend_from_slice(b"%25");
            i += 1;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn merge_slashes(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if b == b'/' && out.last() == Some(&b'/') {
            continue;
        }
        out.push(b);
    }
    out
}

/// RFC 3986 §5.2.4 on an absolute path: `.` segments vanish, `..` removes the segment before
/// it (never above the root), and a path ending in `.` or `..` keeps its trailing slash.
fn remove_dot_segments(bytes: &[u8]) -> Vec<u8> {
    let mut kept: Vec<&[u8]> = Vec::new();
    let segments: Vec<&[u8]> = bytes[1..].split(|&b| b == b'/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            b"." => trailing_slash = i == last,
            b".." => {
                kept.pop();
                trailing_slash = i == last;
            }
            other => {
                kept.push(other);
                trailing_slash = false;
            }
        }
    }
    let mut out = Vec::with_capacity(bytes.len());
    for segment in &kept {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push(b'/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_spelling_of_a_guarded_path_becomes_the_path() {
        for (written, normal) in [
            ("/ws", "/ws"),
            ("//ws", "/ws"),
            ("/./ws", "/ws"),
            ("/x/../ws", "/ws"),
            ("/x/%2e%2E/ws", "/ws"),
            ("/%77s", "/ws"),
            ("/%77%73/a", "/ws/a"),
            ("///ws///a//", "/ws/a/"),
            ("/ws/.", "/ws/"),
            ("/ws/a/..", "/ws/"),
            ("/..", "/"),
            ("/../../ws", "/ws"),
            ("/a/b/../../../c", "/c"),
            ("/", "/"),
            ("/ws%2fx", "/ws%2Fx"),
            ("/ws%2F..%2Fadmin", "/ws%2F..%2Fadmin"),
            ("/a%zz", "/a%25zz"),
            ("/a%4", "/a%254"),
            ("/%%610", "/%25a0"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/.hidden/..x", "/.hidden/..x"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(written), normal, "{written}");
        }
        assert!(matches!(normalize("/ws/devices/v1"), Cow::Borrowed(_)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn normalising_is_idempotent_and_never_panics(
            path in "/[a-zA-Z0-9/._~%-]{0,40}",
            bytes in proptest::collection::vec(any::<u8>(), 0..60),
        ) {
            let once = normalize(&path).into_owned();
            prop_assert_eq!(normalize(&once).into_owned(), once.clone());
            prop_assert!(once.starts_with('/'));
            prop_assert!(!once.contains("//"), "{}", once);
            prop_assert!(!once.split('/').any(|s| s == "." || s == ".."), "{}", once);
            let text = format!("/{}", String::from_utf8_lossy(&bytes));
            let once = normalize(&text).into_owned();
            prop_assert_eq!(normalize(&once).into_owned(), once);
        }
    }
}
