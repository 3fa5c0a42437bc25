//! The backend gets exactly what fwgate decided on, on both HTTP paths (the fast path and
//! hyper's): repeated or conflicting version values are refused, a header fwgate decides on
//! cannot be stripped by `Connection`, headers with `_` are dropped, query keys match however
//! they are spelled, and `path_prefix` rules see (and the backend gets) the normalised path.

use crate::util::*;

const RULES: &str = r#"
[version]
sources = [ { header = "x-firmware-version" }, { query = "fw" } ]

[[rule]]
name = "block-table-scan"
versions = ">=3.8.0-b3"
action = "deny"
status = 503

[[rule]]
name = "admin-only-new"
versions = "<3.0.0-0"
path_prefix = "/admin"
action = "deny"
"#;

/// The same proxy twice: fwgate's own HTTP/1.1 path, and hyper's (`fast_path = false`).
async fn both_paths(backend: std::net::SocketAddr) -> [Proxy; 2] {
    [
        start_proxy(RULES, backend, "").await,
        start_proxy(RULES, backend, "[listen]\nfast_path = false\n").await,
    ]
}

fn raw_get(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: devices.test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

#[tokio::test]
async fn repeated_or_conflicting_versions_are_refused_before_the_backend() {
    let backend = http_backend().await;
    for proxy in both_paths(backend.addr).await {
        let before = backend.requests();
        let cases: &[(&str, &[(&str, &str)])] = &[
            // Allowed first, blocked second.
            (
                "/",
                &[
                    ("X-Firmware-Version", "3.7.2"),
                    ("X-Firmware-Version", "3.8.0-b3"),
                ],
            ),
            // Empty first (was read as missing), blocked second.
            (
                "/",
                &[
                    ("X-Firmware-Version", ""),
                    ("X-Firmware-Version", "3.8.0-b3"),
                ],
            ),
            ("/?fw=&fw=3.8.0-b3", &[]),
            ("/?fw=3.7.2&FW=3.8.0-b3", &[]),
            // Header and query disagree.
            ("/?fw=3.8.0-b3", &[("X-Firmware-Version", "3.7.2")]),
            // The header decided on, named in Connection, would be stripped on the way.
            (
                "/?fw=3.7.2",
                &[
                    ("X-Firmware-Version", "3.7.2"),
                    ("Connection", "x-firmware-version"),
                ],
            ),
        ];
        for (target, headers) in cases {
            let resp = raw_exchange(proxy.addr, &raw_get(target, headers)).await;
            let (status, _, body) = split_response(&resp);
            assert_eq!(status, 400, "{target} {headers:?}: {resp}");
            assert!(body.starts_with("ambiguous request: "), "{body}");
        }
        assert_eq!(
            backend.requests(),
            before,
            "nothing ambiguous reached the backend"
        );
        assert_eq!(
            metric(
                &proxy,
                "fwgate_decisions_total{decision=\"deny\",rule=\"ambiguous\"}"
            )
            .await,
            Some(cases.len() as f64)
        );
        // One value sent twice is one value.
        let resp = raw_exchange(
            proxy.addr,
            &raw_get(
                "/?fw=v3.7.2",
                &[
                    ("X-Firmware-Version", "3.7.2"),
                    ("X-Firmware-Version", "3.7.2"),
                ],
            ),
        )
        .await;
        assert_eq!(split_response(&resp).0, 200, "{resp}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_websocket_handshake_with_two_versions_never_reaches_the_backend() {
    let backend = ws_backend().await;
    for proxy in both_paths(backend.addr).await {
        let handshake = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Firmware-Version: 3.7.2\r\nX-Firmware-Version: 3.8.0-b3\r\n\r\n";
        let resp = raw_exchange(proxy.addr, handshake.as_bytes()).await;
        assert_eq!(split_response(&resp).0, 400, "{resp}");
        proxy.stop().await;
    }
    assert_eq!(backend.connections(), 0);
}

#[tokio::test]
async fn query_keys_match_after_percent_decoding_and_in_any_case() {
    let backend = http_backend().await;
    for proxy in both_paths(backend.addr).await {
        for target in ["/?f%77=3.8.0-b3", "/?FW=3.8.0-b3", "/?%46%57=3.8.0%2Db3"] {
            let resp = raw_exchange(proxy.addr, &raw_get(target, &[])).await;
            assert_eq!(split_response(&resp).0, 503, "{target}: {resp}");
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn header_names_with_underscores_never_reach_the_backend() {
    let backend = http_backend().await;
    for proxy in both_paths(backend.addr).await {
        let resp = raw_exchange(
            proxy.addr,
            &raw_get(
                "/headers",
                &[
                    ("X_Firmware_Version", "3.8.0-b3"),
                    ("X-Firmware-Version", "3.7.2"),
                ],
            ),
        )
        .await;
        let (status, _, body) = split_response(&resp);
        assert_eq!(status, 200, "{resp}");
        assert!(body.contains("x-firmware-version: 3.7.2"), "{body}");
        assert!(
            !body.to_ascii_lowercase().contains("x_firmware_version"),
            "{body}"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn path_prefix_rules_see_and_the_backend_gets_the_normalised_path() {
    let backend = http_backend().await;
    for proxy in both_paths(backend.addr).await {
        let old = [("X-Firmware-Version", "2.1.0")];
        for target in [
            "/admin",
            "//admin",
            "/./admin",
            "/x/../admin",
            "/%61dmin/x",
            "/x/%2e%2e/admin",
        ] {
            let resp = raw_exchange(proxy.addr, &raw_get(target, &old)).await;
            assert_eq!(split_response(&resp).0, 403, "{target}: {resp}");
        }
        for (target, received) in [
            ("//echo/./a//b/../c?x=1", "/echo/a/c?x=1"),
            ("/%65cho/%7Eme", "/echo/~me"),
            ("/echo/plain?fw=2.1.0", "/echo/plain?fw=2.1.0"),
        ] {
            let resp = raw_exchange(proxy.addr, &raw_get(target, &old)).await;
            let (status, _, body) = split_response(&resp);
            assert_eq!((status, body.as_str()), (200, received), "{target}");
        }
        proxy.stop().await;
    }
    let logs = captured_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("path=\"/admin\"") && l.contains("admin-only-new")),
        "the access log shows the normalised path"
    );
}
