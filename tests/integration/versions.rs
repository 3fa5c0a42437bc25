//! Version extraction and decisions through the real proxy.

use crate::util::*;

const RULES: &str = r#"
[version]
sources = [
  { header = "x-firmware-version" },
  { header = "user-agent", pattern = '^Airtame/(?P<version>\S+)' },
  { query = "fw" },
]
[defaults]
action = "allow"
missing = "allow"
unparseable = "deny"
status = 400
body = "unreadable firmware version"

[[rule]]
name = "block-table-scan"
versions = ">=3.8.0-b3"
action = "deny"
status = 503
retry_after = "100s"
jitter = 0.5
body = "firmware 3.8.0-b3+ is temporarily refused"

[[rule]]
name = "shadow-old"
versions = "<2"
action = "deny"
mode = "shadow"
"#;

#[tokio::test]
async fn each_source_kind_and_their_order() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16);
    let cases: &[Case] = &[
        ("/", &[("X-Firmware-Version", "3.8.0-b3")], 503),
        ("/", &[("User-Agent", "Airtame/3.8.0-b3 (linux)")], 503),
        ("/?fw=3.8.0-b3", &[], 503),
        ("/", &[("User-Agent", "Airtame/3.8.0-b2")], 200),
        // Sources that agree: the first is decided on.
        (
            "/?fw=3.7.0",
            &[
                ("X-Firmware-Version", "v3.7"),
                ("User-Agent", "Airtame/3.7.0"),
            ],
            200,
        ),
        // Sources that disagree: never decided on one while the backend may read another.
        (
            "/?fw=3.8.0-b3",
            &[
                ("X-Firmware-Version", "3.7.0"),
                ("User-Agent", "Airtame/3.9.0"),
            ],
            400,
        ),
        ("/?fw=3.7.0", &[("User-Agent", "Airtame/3.9.0")], 400),
        // A user agent the pattern does not match yields nothing.
        ("/?fw=3.8.0-b3", &[("User-Agent", "Mozilla/5.0")], 503),
    ];
    for (path, headers, want) in cases {
        let (status, _, body) = get(proxy.addr, path, headers).await;
        assert_eq!(status, *want, "{path} {headers:?}: body {body:?}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn lenient_forms_are_understood() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    for v in [
        "v3.8.0-b3",
        "V3.8.0b3",
        " 3.8.0-b10 ",
        "3.8",
        "3.9.0-b1",
        "4",
        "3.8.0-b3+build.5",
        "3.8.0b4",
    ] {
        let (status, _, _) = get(proxy.addr, "/", &[("X-Firmware-Version", v)]).await;
        assert_eq!(status, 503, "{v:?} should be refused by >=3.8.0-b3");
    }
    // Spellings the firmware ordering means as the same tag: letters in any case, numbers
    // with leading zeros.
    for v in [
        "3.8.0-B3",
        "3.8.0-b03",
        "3.8.0-RC1",
        "V3.8.0-B10",
        "3.8.0-Rc-1",
    ] {
        let (status, _, _) = get(proxy.addr, "/", &[("X-Firmware-Version", v)]).await;
        assert_eq!(status, 503, "{v:?} should be refused by >=3.8.0-b3");
    }
    for v in [
        "3.8.0-b2",
        "v3.7",
        "3.8.0b1",
        "3.7.99+build.9",
        "3.8.0-B02",
        "3.8.0-A9",
    ] {
        let (status, _, _) = get(proxy.addr, "/", &[("X-Firmware-Version", v)]).await;
        assert_eq!(status, 200, "{v:?} should be admitted");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn missing_and_unparseable_use_their_defaults() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let (status, _, body) = get(proxy.addr, "/", &[]).await;
    assert_eq!((status, body.as_str()), (200, "backend ok"));
    let long = "1".repeat(65);
    for bad in ["banana", "3.8.0.1", "3..8", long.as_str(), "3.8.0-"] {
        let (status, _, body) = get(proxy.addr, "/", &[("X-Firmware-Version", bad)]).await;
        assert_eq!(status, 400, "{bad:?}");
        assert_eq!(body, "unreadable firmware version\n");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn deny_has_status_body_jittered_retry_after_and_never_reaches_backend() {
    let backend = http_backend().await;
    // 40 refusals from one client would (rightly) trigger the reconnect backoff; this test is
    // about the deny response itself.
    let proxy = start_proxy(RULES, backend.addr, "[limits.backoff]\nenabled = false\n").await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (status, head, body) =
            get(proxy.addr, "/", &[("X-Firmware-Version", "3.8.0-b3")]).await;
        assert_eq!(status, 503);
        assert_eq!(body, "firmware 3.8.0-b3+ is temporarily refused\n");
        assert_eq!(
            header(&head, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        let retry: u64 = header(&head, "retry-after").unwrap().parse().unwrap();
        assert!(
            (50..=150).contains(&retry),
            "Retry-After {retry} outside 100s ±50%"
        );
        seen.insert(retry);
    }
    assert!(seen.len() > 5, "Retry-After is not jittered: {seen:?}");
    assert_eq!(backend.connections(), 0, "a refusal reached the backend");
    proxy.stop().await;
}

#[tokio::test]
async fn shadow_mode_admits_counts_and_logs() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let (status, _, body) = get(
        proxy.addr,
        "/",
        &[
            ("X-Firmware-Version", "1.2.3"),
            ("X-Device-Id", "shadow-dev-77"),
        ],
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "backend ok"));
    let n = metric(
        &proxy,
        "fwgate_decisions_total{decision=\"shadow_deny\",rule=\"shadow-old\"}",
    )
    .await;
    assert_eq!(n, Some(1.0));
    let logs = captured_logs();
    let line = logs
        .lines()
        .find(|l| l.contains("shadow-dev-77") && l.contains("shadow"))
        .unwrap_or_else(|| panic!("no shadow log line for the device in:\n{logs}"));
    assert!(line.contains("shadow-old"), "{line}");
    proxy.stop().await;
}

#[tokio::test]
async fn forwarded_requests_log_bytes_each_way() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let body = "z".repeat(1500);
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nX-Device-Id: bytes-dev-9\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, _, answer) = split_response(&raw_exchange(proxy.addr, req.as_bytes()).await);
    assert_eq!((status, answer.as_str()), (200, "1500"));
    eventually("access line with both byte counts", || async {
        captured_logs().lines().any(|l| {
            l.contains("bytes-dev-9") && l.contains("bytes_in=1500") && l.contains("bytes_out=4")
        })
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn refusals_are_logged_with_decision_fields() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    get(
        proxy.addr,
        "/",
        &[
            ("X-Firmware-Version", "v3.8.0b7"),
            ("X-Device-Id", "refused-dev-42"),
        ],
    )
    .await;
    let logs = captured_logs();
    let line = logs
        .lines()
        .find(|l| l.contains("refused-dev-42"))
        .unwrap_or_else(|| panic!("no access log line for the device in:\n{logs}"));
    for field in [
        "raw_version=\"v3.8.0b7\"",
        "version=3.8.0-b7",
        "rule=block-table-scan",
        "status=503",
        "decision=\"deny\"",
        "client=127.0.0.1:",
    ] {
        assert!(line.contains(field), "missing {field} in {line}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn junk_versions_cannot_blind_the_census() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    // One connection pipelines 1,500 refused requests, each with a version never seen before.
    let mut pipelined = Vec::new();
    for i in 0..1_500 {
        let close = if i == 1_499 {
            "Connection: close\r\n"
        } else {
            ""
        };
        pipelined.extend_from_slice(
            format!("GET / HTTP/1.1\r\nHost: x\r\n{close}X-Firmware-Version: 9.{i}.0\r\n\r\n")
                .as_bytes(),
        );
    }
    let responses = raw_exchange(proxy.addr, &pipelined).await;
    assert_eq!(responses.matches("HTTP/1.1 503").count(), 1_500);
    // Then a real version connects 50 times.
    for _ in 0..50 {
        let (status, _, _) = get(proxy.addr, "/", &[("X-Firmware-Version", "3.7.2")]).await;
        assert_eq!(status, 200);
    }
    let (_, body) = admin_get(&proxy, "/v1/versions").await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = report["versions"].as_array().unwrap();
    assert!(rows.len() <= 100, "bounded report");
    assert_eq!(
        rows[0]["version"], "3.7.2",
        "the real cohort is listed first: {}",
        rows[0]
    );
    assert_eq!(rows[0]["handshakes_last_minute"], 50);
    assert_eq!(rows[0]["admitted_last_minute"], 50);
    // Every junk refusal is still counted: in its own row or in `other`.
    let junk_listed: u64 = rows[1..]
        .iter()
        .map(|r| r["refused_last_minute"]["deny"].as_u64().unwrap())
        .sum();
    let other = report["other"]["refused_last_minute"]["deny"]
        .as_u64()
        .unwrap();
    assert_eq!(junk_listed + other, 1_500, "{}", report["other"]);
    proxy.stop().await;
}
