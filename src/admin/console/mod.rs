//! The incident console: `GET /` on the admin listener serves one page that renders the JSON
//! endpoints (`/v1/versions`, `/v1/timeline`, `/v1/killswitch`, `/v1/rules`, ...) and nothing
//! else, so it can never disagree with `curl`. Its assets are compiled into the binary: no CDN,
//! no build step, and it works with no internet access.
//!
//! Security model: the page is as open as the `GET` endpoints it reads. Actions (kill-switch add
//! and lift) go through the same mutating endpoints as the CLI, with the bearer token the
//! operator types into the page; the script keeps it in a variable only. Every asset is served
//! with `Content-Security-Policy: default-src 'self'` (the HTML has no inline script, style or
//! event handler), `nosniff`, `no-referrer`, `Cache-Control: no-cache` and an `ETag`, so a
//! reload after an upgrade never runs a stale script and an unchanged one costs a 304.

use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{
    HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::Full;

/// The policy on every console response: only this origin's own files and JSON; no inline
/// code; no `<base>` tricks; no form posts anywhere; never framed (actions are clickable).
pub const CONTENT_SECURITY_POLICY_VALUE: &str =
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    /// Request path.
    path: &'static str,
    /// `Content-Type`.
    content_type: &'static str,
    /// The file, compiled in.
    body: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file of the console. The scripts are ES modules: `/console.js` imports the others
/// from `/console/`.
const ASSETS: [Asset; 9] = [
    Asset {
        path: "/",
        content_type: HTML,
        body: include_str!("index.html"),
    },
    Asset {
        path: "/console.css",
        content_type: CSS,
        body: include_str!("console.css"),
    },
    Asset {
        path: "/console.js",
        content_type: JS,
        body: include_str!("console.js"),
    },
    Asset {
        path: "/console/dom.js",
        content_type: JS,
        body: include_str!("dom.js"),
    },
    Asset {
        path: "/console/api.js",
        content_type: JS,
        body: include_str!("api.js"),
    },
    Asset {
        path: "/console/chart.js",
        content_type: JS,
        body: include_str!("chart.js"),
    },
    Asset {
        path: "/console/cohorts.js",
        content_type: JS,
        body: include_str!("cohorts.js"),
    },
    Asset {
        path: "/console/killswitch.js",
        content_type: JS,
        body: include_str!("killswitch.js"),
    },
    Asset {
        path: "/console/panels.js",
        content_type: JS,
        body: include_str!("panels.js"),
    },
];

/// The console's answer to `method path`, or `None` when the path is not the console's (the
/// admin API routes it). Handles `GET` and `HEAD`; other methods get 405.
pub fn serve(method: &Method, path: &str, headers: &HeaderMap) -> Option<Response<Full<Bytes>>> {
    let index = match path {
        "/index.html" => Some(0),
        // Browsers ask for it; an empty answer keeps the console free of 404 noise.
        "/favicon.ico" => None,
        _ => Some(ASSETS.iter().position(|a| a.path == path)?),
    };
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(r);
    }
    let Some(index) = index else {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        secure(r.headers_mut());
        return Some(r);
    };
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let fresh = headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .any(|v| if_none_match_hits(v.as_bytes(), etag.as_bytes()));
    let mut r = if fresh {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(asset.body.as_bytes())));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        r
    };
    let h = r.headers_mut();
    secure(h);
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(ETAG, etag.clone());
    Some(r)
}

/// The headers every console response carries.
fn secure(h: &mut HeaderMap) {
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
    );
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    secure(r.headers_mut());
    r
}

/// The strong `ETag` of each asset, in [`ASSETS`] order: a hash of its bytes, computed once.
fn etags() -> &'static [HeaderValue] {
    static ETAGS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let tag = format!("\"{:016x}\"", fnv1a64(a.body.as_bytes()));
                // Quotes and hex digits only: always a valid header value.
                HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
            })
            .collect()
    })
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike `DefaultHasher`), and enough to
/// tell two versions of a file apart.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Whether one `If-None-Match` header value names `etag` (a list; `*`; weak `W/` tags
/// compare equal, as RFC 9110 asks for this header).
fn if_none_match_hits(value: &[u8], etag: &[u8]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    value.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate).as_bytes() == etag
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, headers: &HeaderMap) -> Option<Response<Full<Bytes>>> {
        serve(&Method::GET, path, headers)
    }

    #[test]
    fn every_asset_is_served_with_the_policy_and_an_etag() {
        for asset in &ASSETS {
            let r = get(asset.path, &HeaderMap::new()).expect("console path");
            assert_eq!(r.status(), StatusCode::OK, "{}", asset.path);
            let h = r.headers();
            assert_eq!(h[CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY_VALUE);
            assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[REFERRER_POLICY], "no-referrer");
            assert_eq!(h[CACHE_CONTROL], "no-cache");
            assert!(h[ETAG].to_str().unwrap().starts_with('"'));
        }
        assert!(get("/v1/versions", &HeaderMap::new()).is_none());
        assert!(get("/console/nope.js", &HeaderMap::new()).is_none());
    }

    #[test]
    fn a_matching_etag_gets_304_and_a_stale_one_the_file() {
        let etag = get("/console.js", &HeaderMap::new()).unwrap().headers()[ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(IF_NONE_MATCH, etag.clone());
        assert_eq!(
            get("/console.js", &h).unwrap().status(),
            StatusCode::NOT_MODIFIED
        );
        let weak = format!("\"other\", W/{}", etag.to_str().unwrap());
        h.insert(IF_NONE_MATCH, HeaderValue::from_str(&weak).unwrap());
        assert_eq!(
            get("/console.js", &h).unwrap().status(),
            StatusCode::NOT_MODIFIED
        );
        h.insert(IF_NONE_MATCH, HeaderValue::from_static("\"stale\""));
        assert_eq!(get("/console.js", &h).unwrap().status(), StatusCode::OK);
        // Another file's tag is not this file's.
        let css = get("/console.css", &HeaderMap::new()).unwrap().headers()[ETAG].clone();
        assert_ne!(css, etag);
    }

    #[test]
    fn the_html_has_no_inline_code_the_policy_would_block() {
        let html = ASSETS[0].body.to_ascii_lowercase();
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').unwrap_or(0)];
            assert!(tag.contains(" src="), "inline script: {tag}");
        }
        assert!(!html.contains("<style"), "inline <style>");
        assert!(!html.contains(" style="), "inline style attribute");
        for attr in [
            " onclick=",
            " onload=",
            " onsubmit=",
            " oninput=",
            " onchange=",
        ] {
            assert!(!html.contains(attr), "inline handler {attr}");
        }
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "external URL"
        );
    }

    #[test]
    fn other_methods_get_405_and_the_favicon_nothing() {
        let r = serve(&Method::POST, "/", &HeaderMap::new()).unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        let r = get("/favicon.ico", &HeaderMap::new()).unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
}
