//! Rate limits, concurrency caps, global caps, reconnect backoff and backend protection,
//! through the real proxy.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

const NO_RULES: &str = "# no rules: defaults only\n";

async fn status_of(proxy: &Proxy, headers: &[(&str, &str)]) -> (u16, Option<u64>) {
    let (status, head, _) = get(proxy.addr, "/", headers).await;
    (
        status,
        header(&head, "retry-after").and_then(|v| v.parse().ok()),
    )
}

#[tokio::test]
async fn burst_then_429_with_retry_after_from_the_limiter() {
    let backend = http_backend().await;
    let rules = r#"
[[rule]]
name = "suspicious"
versions = ">=3.8.0-b3"
action = "limit"
rate = "1/m"
burst = 3
jitter = 0.5
"#;
    let proxy = start_proxy(rules, backend.addr, "[limits.backoff]\nenabled = false\n").await;
    for _ in 0..3 {
        assert_eq!(
            status_of(&proxy, &[("X-Firmware-Version", "3.8.0")])
                .await
                .0,
            200
        );
    }
    for _ in 0..3 {
        let (status, retry) = status_of(&proxy, &[("X-Firmware-Version", "3.8.0")]).await;
        assert_eq!(status, 429);
        let retry = retry.expect("Retry-After on a limit refusal");
        // Next admission is within 60 s; the jitter only ever adds (up to +50%).
        assert!((1..=90).contains(&retry), "Retry-After {retry}");
    }
    // Other versions are not throttled by this rule.
    assert_eq!(
        status_of(&proxy, &[("X-Firmware-Version", "3.7.0")])
            .await
            .0,
        200
    );
    assert_eq!(
        metric(
            &proxy,
            "fwgate_decisions_total{decision=\"limited\",rule=\"suspicious\"}"
        )
        .await,
        Some(3.0)
    );
    assert!(
        captured_logs()
            .lines()
            .any(|l| l.contains("rule=suspicious")
                && l.contains("decision=\"limited\"")
                && l.contains("status=429")),
        "a limit refusal must be logged as limited"
    );
    assert_eq!(
        backend.requests(),
        4,
        "limited requests reached the backend"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn per_device_keys_are_independent_and_fall_back_to_ip() {
    let backend = http_backend().await;
    let rules = "[[rule]]\nname = \"per-device\"\nversions = \"*\"\naction = \"limit\"\nrate = \"1/m\"\nburst = 1\nkey = \"device\"\n";
    let proxy = start_proxy(rules, backend.addr, "[limits.backoff]\nenabled = false\n").await;
    let dev = |id: &'static str| [("X-Firmware-Version", "1.0.0"), ("X-Device-Id", id)];
    assert_eq!(status_of(&proxy, &dev("a")).await.0, 200);
    assert_eq!(status_of(&proxy, &dev("a")).await.0, 429);
    assert_eq!(
        status_of(&proxy, &dev("b")).await.0,
        200,
        "device b has its own budget"
    );
    // No device id: keyed by the client IP (127.0.0.1), which has its own budget too.
    assert_eq!(
        status_of(&proxy, &[("X-Firmware-Version", "1.0.0")])
            .await
            .0,
        200
    );
    assert_eq!(
        status_of(&proxy, &[("X-Firmware-Version", "1.0.0")])
            .await
            .0,
        429
    );
    proxy.stop().await;
}

#[tokio::test]
async fn concurrency_cap_is_released_when_a_tunnel_closes() {
    let backend = ws_backend().await;
    let rules = "[[rule]]\nname = \"cap\"\nversions = \"*\"\naction = \"limit\"\nmax_connections = 2\nretry_after = \"7s\"\njitter = 0.0\n";
    let proxy = start_proxy(rules, backend.addr, "[limits.backoff]\nenabled = false\n").await;
    let h = [("X-Firmware-Version", "1.0.0")];
    let mut first = ws_connect(proxy.addr, "/ws", &h).await.unwrap();
    let _second = ws_connect(proxy.addr, "/ws", &h).await.unwrap();
    match ws_connect(proxy.addr, "/ws", &h).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            assert_eq!(resp.headers()["retry-after"], "7");
        }
        other => panic!(
            "third tunnel should be refused, got {:?}",
            other.map(|_| ())
        ),
    }
    first.send(Message::Close(None)).await.unwrap();
    while let Some(Ok(_)) = first.next().await {}
    drop(first);
    eventually("a slot frees when a tunnel closes", || async {
        ws_connect(proxy.addr, "/ws", &h).await.is_ok()
    })
    .await;
    assert_eq!(backend.connections(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn reconnect_backoff_holds_back_a_hammering_device_without_backend_contact() {
    let backend = http_backend().await;
    let rules =
        "[[rule]]\nname = \"bad\"\nversions = \">=3.8.0-b3\"\naction = \"deny\"\nstatus = 503\n";
    let proxy = start_proxy(
        rules,
        backend.addr,
        "[limits.backoff]\nthreshold = 3\nwindow = \"60s\"\nbase = \"30s\"\nmax = \"5m\"\n",
    )
    .await;
    let bad = [("X-Firmware-Version", "3.8.0"), ("X-Device-Id", "hammer-1")];
    for _ in 0..4 {
        let (status, retry) = status_of(&proxy, &bad).await;
        assert_eq!(status, 503);
        assert!(retry.is_none(), "the deny rule sets no Retry-After");
    }
    // Over the threshold: held back, told when to return (30 s, jittered upwards only).
    let (status, retry) = status_of(&proxy, &bad).await;
    assert_eq!(status, 503);
    let retry = retry.expect("backoff gives a Retry-After");
    assert!((29..=38).contains(&retry), "{retry}");
    assert_eq!(
        metric(
            &proxy,
            "fwgate_decisions_total{decision=\"limited\",rule=\"backoff\"}"
        )
        .await,
        Some(1.0)
    );
    // Another device is unaffected; nothing reached the backend.
    assert_eq!(
        status_of(
            &proxy,
            &[("X-Firmware-Version", "3.7.0"), ("X-Device-Id", "ok-1")]
        )
        .await
        .0,
        200
    );
    assert_eq!(backend.requests(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn global_max_connections_refuses_at_accept() {
    let backend = ws_backend().await;
    let proxy = start_proxy(NO_RULES, backend.addr, "[limits]\nmax_connections = 1\n").await;
    let _held = ws_connect(proxy.addr, "/ws", &[]).await.unwrap();
    let resp = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (status, head, body) = split_response(&resp);
    assert_eq!(status, 503, "{resp}");
    assert!(header(&head, "retry-after").is_some());
    assert_eq!(body, "too many open connections, retry later\n");
    assert_eq!(backend.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn global_handshake_and_per_ip_rates() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        NO_RULES,
        backend.addr,
        "[limits]\nhandshake_rate = \"2/m\"\n[limits.backoff]\nenabled = false\n",
    )
    .await;
    assert_eq!(status_of(&proxy, &[]).await.0, 200);
    assert_eq!(status_of(&proxy, &[]).await.0, 200);
    let (status, retry) = status_of(&proxy, &[]).await;
    assert_eq!(status, 503);
    assert!(retry.is_some());
    proxy.stop().await;

    let proxy = start_proxy(
        NO_RULES,
        backend.addr,
        "[limits]\nper_ip_rate = \"1/m\"\n[limits.backoff]\nenabled = false\n",
    )
    .await;
    assert_eq!(status_of(&proxy, &[]).await.0, 200);
    assert_eq!(status_of(&proxy, &[]).await.0, 503);
    assert_eq!(
        metric(
            &proxy,
            "fwgate_decisions_total{decision=\"limited\",rule=\"global:per_ip_rate\"}"
        )
        .await,
        Some(1.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn backend_capacity_answers_503_at_once() {
    let backend = ws_backend().await;
    let proxy = start_proxy(NO_RULES, backend.addr, "[upstream]\nmax_connections = 1\n").await;
    let _held = ws_connect(proxy.addr, "/ws", &[]).await.unwrap();
    match ws_connect(proxy.addr, "/ws", &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(backend.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn limit_state_survives_a_reload() {
    let backend = http_backend().await;
    let rules =
        "[[rule]]\nname = \"r\"\nversions = \"*\"\naction = \"limit\"\nrate = \"1/m\"\nburst = 1\n";
    let proxy = start_proxy(rules, backend.addr, "[limits.backoff]\nenabled = false\n").await;
    assert_eq!(
        status_of(&proxy, &[("X-Firmware-Version", "1.0.0")])
            .await
            .0,
        200
    );
    // Reload with an unrelated change: the spent bucket must not refill.
    std::fs::write(
        proxy.rules_path(),
        format!("{rules}\n[[rule]]\nname = \"other\"\nversions = \"=9.9.9\"\naction = \"deny\"\n"),
    )
    .unwrap();
    eventually("reload applied", || async {
        metric(&proxy, "fwgate_rules_generation").await == Some(2.0)
    })
    .await;
    assert_eq!(
        status_of(&proxy, &[("X-Firmware-Version", "1.0.0")])
            .await
            .0,
        429
    );
    proxy.stop().await;
}
