//! The admin API's bearer token: read from `[admin] token_file` or `FWGATE_ADMIN_TOKEN`,
//! never logged or shown, compared in constant time. Every mutating endpoint asks it first.

use std::sync::Arc;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::json_response;

/// The admin API's bearer token; never logged, never shown.
#[derive(Clone, Default)]
pub struct AdminToken(Option<Arc<str>>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "AdminToken(set)"
        } else {
            "AdminToken(unset)"
        })
    }
}

impl AdminToken {
    /// A configured token (surrounding whitespace, e.g. a trailing newline, is ignored).
    pub fn new(token: &str) -> AdminToken {
        let t = token.trim();
        AdminToken((!t.is_empty()).then(|| Arc::from(t)))
    }

    /// No token: mutating endpoints answer 403 with how to configure one.
    pub fn none() -> AdminToken {
        AdminToken(None)
    }

    /// Whether a token is configured.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn check(&self, headers: &http::HeaderMap) -> Result<(), AuthFailure> {
        let Some(expected) = &self.0 else {
            return Err(AuthFailure::NoTokenConfigured);
        };
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(AuthFailure::WrongToken)
        }
    }

    /// Checks the bearer token; on failure, the response to send (403 or 401).
    pub fn authorize(&self, headers: &http::HeaderMap) -> Option<Response<Full<Bytes>>> {
        match self.check(headers) {
            Ok(()) => None,
            Err(AuthFailure::NoTokenConfigured) => Some(json_response(
                StatusCode::FORBIDDEN,
                &json!({"error": "no admin token configured: set [admin] token_file in fwgate.toml or the FWGATE_ADMIN_TOKEN environment variable, then restart"}),
            )),
            Err(AuthFailure::WrongToken) => Some(json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "missing or wrong bearer token"}),
            )),
        }
    }
}

/// Why a mutating request was not authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthFailure {
    /// No token is configured, so nothing may mutate.
    NoTokenConfigured,
    /// The request's token is missing or wrong.
    WrongToken,
}

/// Compares without an early exit on the first differing byte (timing does not leak the token).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_is_trimmed_and_never_debug_printed() {
        let t = AdminToken::new("s3cret\n");
        assert!(t.is_set());
        assert!(!format!("{t:?}").contains("s3cret"));
        let mut h = http::HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(t.authorize(&h).is_none());
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer nope"));
        assert_eq!(t.authorize(&h).unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            AdminToken::none().authorize(&h).unwrap().status(),
            StatusCode::FORBIDDEN
        );
    }
}
