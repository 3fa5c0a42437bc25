//! The admin listener: health, readiness, metrics moving with traffic, census, auth.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

const RULES: &str = r#"
[[rule]]
name = "block"
versions = ">=3.8.0-b3"
action = "deny"
"#;

#[tokio::test]
async fn health_and_readiness() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    assert_eq!(admin_get(&proxy, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(admin_get(&proxy, "/readyz").await, (200, "ready\n".into()));
    proxy.gate.start_draining();
    assert_eq!(admin_get(&proxy, "/readyz").await.0, 503);
    assert_eq!(admin_get(&proxy, "/nope").await.0, 404);
    proxy.stop().await;
}

#[tokio::test]
async fn metrics_move_with_real_traffic() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    for _ in 0..3 {
        get(proxy.addr, "/", &[("X-Firmware-Version", "3.8.0")]).await;
    }
    for _ in 0..2 {
        get(proxy.addr, "/", &[("X-Firmware-Version", "3.7.0")]).await;
    }
    assert_eq!(
        metric(
            &proxy,
            "fwgate_decisions_total{decision=\"deny\",rule=\"block\"}"
        )
        .await,
        Some(3.0)
    );
    assert_eq!(
        metric(
            &proxy,
            "fwgate_decisions_total{decision=\"allow\",rule=\"default\"}"
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        metric(&proxy, "fwgate_upstream_requests_total{outcome=\"ok\"}").await,
        Some(2.0)
    );
    assert_eq!(metric(&proxy, "fwgate_rules_generation").await, Some(1.0));
    let (_, text) = admin_get(&proxy, "/metrics").await;
    assert!(
        text.contains("fwgate_upstream_connect_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains("fwgate_build_info{version=\""), "{text}");
    assert!(!text.contains("3.8.0"), "a raw version leaked into a label");
    proxy.stop().await;
}

/// A rule that is renamed or deleted must not leave its series behind for the life of the
/// process: they go at the next sweep once nothing counts into them.
#[tokio::test]
async fn series_of_a_removed_rule_are_dropped() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    get(proxy.addr, "/", &[("X-Firmware-Version", "3.8.0")]).await;
    let old = "fwgate_decisions_total{decision=\"deny\",rule=\"block\"}";
    assert_eq!(metric(&proxy, old).await, Some(1.0));
    let renamed = RULES.replace("\"block\"", "\"block-renamed\"");
    std::fs::write(proxy.rules_path(), renamed).unwrap();
    let (status, body) = admin_post(&proxy, "/v1/reload", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{body}");
    get(proxy.addr, "/", &[("X-Firmware-Version", "3.8.0")]).await;
    let new = "fwgate_decisions_total{decision=\"deny\",rule=\"block-renamed\"}";
    assert_eq!(metric(&proxy, new).await, Some(1.0));
    eventually("the removed rule's series are dropped", || async {
        metric(&proxy, old).await.is_none()
    })
    .await;
    let (_, text) = admin_get(&proxy, "/metrics").await;
    assert!(!text.contains("rule=\"block\""), "{text}");
    assert!(text.contains("rule=\"default\""), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn census_reflects_connected_clients() {
    let backend = ws_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let mut socks = Vec::new();
    for _ in 0..3 {
        let mut ws = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "v3.7.1")])
            .await
            .unwrap();
        ws.send(Message::text("hi")).await.unwrap();
        ws.next().await.unwrap().unwrap();
        socks.push(ws);
    }
    let _ = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "3.8.0-b5")]).await;
    let (status, body) = admin_get(&proxy, "/v1/versions").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = v["versions"].as_array().unwrap();
    let row = |ver: &str| {
        rows.iter()
            .find(|r| r["version"] == ver)
            .cloned()
            .unwrap_or_else(|| panic!("{ver} missing in {body}"))
    };
    let ok = row("3.7.1");
    assert_eq!(ok["active_connections"], 3);
    assert_eq!(ok["handshakes_last_minute"], 3);
    assert_eq!(ok["decision"], "allow");
    let bad = row("3.8.0-b5");
    assert_eq!(bad["active_connections"], 0);
    assert_eq!(bad["handshakes_last_hour"], 1);
    assert_eq!(bad["decision"], "deny");
    assert_eq!(bad["rule"], "block");
    proxy.stop().await;
}

#[tokio::test]
async fn rules_endpoint_shows_what_is_in_force() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let (status, body) = admin_get(&proxy, "/v1/rules").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["generation"], 1);
    assert_eq!(v["rules"][0]["name"], "block");
    assert_eq!(v["rules"][0]["versions"], ">=3.8.0-b3");
    assert!(v["last_error"].is_null());
    assert_eq!(v["content_hash"].as_str().unwrap().len(), 16);
    proxy.stop().await;
}

#[tokio::test]
async fn mutating_endpoints_need_the_token() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    assert_eq!(admin_post(&proxy, "/v1/reload", None, "").await.0, 401);
    assert_eq!(
        admin_post(&proxy, "/v1/reload", Some("wrong"), "").await.0,
        401
    );
    let (status, body) = admin_post(&proxy, "/v1/reload", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"unchanged\""), "{body}");
    assert_eq!(admin_get(&proxy, "/v1/reload").await.0, 405);
    proxy.stop().await;
}

/// `/metrics` exports a decision series only where that decision can happen: fixed limits
/// only refuse (`limited`), deny rules and kill-switch entries only `deny`, shadow rules only
/// `shadow_*`, and only deciders that admit have an open-connection gauge.
#[tokio::test]
async fn only_series_that_can_move_are_exported() {
    let backend = http_backend().await;
    let rules = r#"
[[rule]]
name = "block"
versions = "<1.0.0"
action = "deny"

[[rule]]
name = "try"
versions = "<2.0.0"
action = "deny"
mode = "shadow"

[[rule]]
name = "throttle"
versions = "<3.0.0"
action = "limit"
rate = "10/s"
"#;
    let proxy = start_proxy(rules, backend.addr, "").await;
    let (status, text) = admin_post(
        &proxy,
        "/v1/killswitch",
        Some(TEST_TOKEN),
        r#"{"versions": ">=9", "reason": "series probe", "id": "probe"}"#,
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let (_, body) = admin_get(&proxy, "/metrics").await;
    let has = |series: &str| body.lines().any(|l| l.starts_with(series));
    for present in [
        "fwgate_decisions_total{decision=\"limited\",rule=\"backoff\"}",
        "fwgate_decisions_total{decision=\"limited\",rule=\"global:per_ip_rate\"}",
        "fwgate_decisions_total{decision=\"deny\",rule=\"block\"}",
        "fwgate_decisions_total{decision=\"shadow_deny\",rule=\"try\"}",
        "fwgate_decisions_total{decision=\"allow\",rule=\"throttle\"}",
        "fwgate_decisions_total{decision=\"limited\",rule=\"throttle\"}",
        "fwgate_decisions_total{decision=\"allow\",rule=\"default\"}",
        "fwgate_decisions_total{decision=\"deny\",rule=\"killswitch:probe\"}",
        "fwgate_active_connections{rule=\"throttle\"}",
    ] {
        assert!(has(present), "missing {present}:\n{body}");
    }
    for absent in [
        "fwgate_decisions_total{decision=\"allow\",rule=\"backoff\"}",
        "fwgate_decisions_total{decision=\"deny\",rule=\"backoff\"}",
        "fwgate_decisions_total{decision=\"shadow_allow\",rule=\"upstream:capacity\"}",
        "fwgate_decisions_total{decision=\"allow\",rule=\"block\"}",
        "fwgate_decisions_total{decision=\"limited\",rule=\"block\"}",
        "fwgate_decisions_total{decision=\"deny\",rule=\"try\"}",
        "fwgate_decisions_total{decision=\"shadow_allow\",rule=\"try\"}",
        "fwgate_decisions_total{decision=\"deny\",rule=\"throttle\"}",
        "fwgate_decisions_total{decision=\"allow\",rule=\"killswitch:probe\"}",
        "fwgate_active_connections{rule=\"block\"}",
        "fwgate_active_connections{rule=\"backoff\"}",
        "fwgate_active_connections{rule=\"killswitch:probe\"}",
    ] {
        assert!(!has(absent), "{absent} can never move:\n{body}");
    }
    proxy.stop().await;
}
