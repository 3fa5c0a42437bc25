//! The census as an incident tool: per-version backend health (time to the 101, errors,
//! churn), suspects flagged against the rest of the fleet, the 15-minute timeline, and the
//! per-rule metrics behind them.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpListener;

use crate::util::*;

/// A WebSocket backend that answers handshakes of firmware `slow_version` after `delay`
/// (the table scan of the incident) and every other one at once.
async fn slow_cohort_backend(slow_version: &'static str, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Look at the head without consuming it, then let tungstenite read it.
                let mut buf = [0u8; 2048];
                let mut seen = 0;
                for _ in 0..100 {
                    let Ok(n) = stream.peek(&mut buf).await else {
                        return;
                    };
                    seen = n;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                    stream.readable().await.ok();
                }
                let head = String::from_utf8_lossy(&buf[..seen]).to_ascii_lowercase();
                if head.contains(&format!("x-firmware-version: {slow_version}")) {
                    tokio::time::sleep(delay).await;
                }
                if let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    });
    addr
}

async fn open_and_close(proxy: &Proxy, version: &str, device: &str) {
    let mut ws = ws_connect(
        proxy.addr,
        "/ws",
        &[("X-Firmware-Version", version), ("X-Device-Id", device)],
    )
    .await
    .unwrap_or_else(|e| panic!("{version} refused: {e}"));
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
}

#[tokio::test]
async fn a_cohort_the_backend_answers_twenty_times_slower_is_flagged_first() {
    let backend = slow_cohort_backend("3.8.0-b3", Duration::from_millis(200)).await;
    let proxy = start_proxy("# defaults\n", backend, "").await;
    for i in 0..30 {
        open_and_close(&proxy, "3.7.2", &format!("good-{i}")).await;
    }
    for i in 0..12 {
        open_and_close(&proxy, "3.8.0-b3", &format!("bad-{i}")).await;
    }
    eventually("every tunnel end is counted", || async {
        let (_, body) = admin_get(&proxy, "/v1/versions").await;
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        report["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["tunnels_last_minute"]["ended"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 42
    })
    .await;
    let (_, body) = admin_get(&proxy, "/v1/versions").await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["suspects"], 1, "{report:#}");
    let rows = report["versions"].as_array().unwrap();
    let bad = &rows[0];
    assert_eq!(bad["version"], "3.8.0-b3", "suspects first: {report:#}");
    let backend = &bad["backend_last_minute"];
    assert_eq!(backend["samples"], 12);
    assert!(backend["p99_ms"].as_f64().unwrap() >= 150.0, "{backend}");
    let suspect = &bad["suspect"];
    assert!(
        suspect["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("backend p99"),
        "{suspect}"
    );
    assert_eq!(
        suspect["kill_command"],
        "fwgate kill add '=3.8.0-b3' --reason 'backend trouble from 3.8.0-b3 (console suspect)' --ttl 1h"
    );
    assert!(suspect["limit_rule"]
        .as_str()
        .unwrap()
        .contains("versions = \"=3.8.0-b3\""));
    let good = &rows[1];
    assert_eq!(good["version"], "3.7.2");
    assert!(good["suspect"].is_null(), "{good}");
    assert!(
        good["backend_last_minute"]["p99_ms"].as_f64().unwrap() < 50.0,
        "{good}"
    );
    // Every tunnel here closed at once: churn, counted per version.
    assert_eq!(good["tunnels_last_minute"]["short"], 30);
    // Nothing is enforced on its own: the slow cohort is still admitted.
    open_and_close(&proxy, "3.8.0-b3", "bad-after").await;

    // The timeline holds the same decisions, and the rule's metrics the same answers.
    let (_, body) = admin_get(&proxy, "/v1/timeline").await;
    let timeline: serde_json::Value = serde_json::from_str(&body).unwrap();
    let slots = timeline["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 90);
    let admitted: u64 = slots.iter().map(|s| s["admitted"].as_u64().unwrap()).sum();
    assert_eq!(admitted, 43);
    assert!(slots
        .iter()
        .any(|s| s["backend_p99_ms"].as_f64().unwrap_or(0.0) >= 150.0));
    assert_eq!(
        metric(
            &proxy,
            "fwgate_backend_response_seconds_count{rule=\"default\"}"
        )
        .await,
        Some(43.0)
    );
    eventually(
        "the 43 short tunnels are counted for their rule",
        || async {
            metric(&proxy, "fwgate_short_tunnels_total{rule=\"default\"}").await == Some(43.0)
        },
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn backend_failures_count_per_version_and_per_rule() {
    // Nothing listens there: every admitted request is a backend error (502).
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy("# defaults\n", dead, "").await;
    for _ in 0..3 {
        let (status, _, _) = get(proxy.addr, "/", &[("X-Firmware-Version", "1.2.3")]).await;
        assert_eq!(status, 502);
    }
    let (_, body) = admin_get(&proxy, "/v1/versions").await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let row = &report["versions"][0];
    assert_eq!(row["version"], "1.2.3");
    assert_eq!(row["backend_last_minute"]["errors"], 3, "{row}");
    assert!(row["backend_last_minute"]["p99_ms"].is_null(), "{row}");
    assert_eq!(
        metric(&proxy, "fwgate_backend_failures_total{rule=\"default\"}").await,
        Some(3.0)
    );
    // A refusing rule never reaches the backend: no health series for it.
    let (_, metrics) = admin_get(&proxy, "/metrics").await;
    assert!(
        !metrics.contains("fwgate_backend_failures_total{rule=\"unparseable\"}"),
        "{metrics}"
    );
    proxy.stop().await;
}
