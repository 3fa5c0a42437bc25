//! The reconnect backoff in the deployment shapes it must be right in: many devices behind
//! one address, spoofed device ids from another address, churn versus long-lived tunnels,
//! closes fwgate caused itself, and whether a hold-back can be seen.

use std::net::{IpAddr, Ipv4Addr};

use crate::util::*;

const HOME: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Opens a tunnel and closes it at once (a WebSocket close handshake): one short tunnel.
async fn churn_once(proxy: &Proxy, from: IpAddr, headers: &[(&str, &str)]) -> u16 {
    let result = ws_connect_from(from, proxy.addr, "/ws", headers).await;
    let status = handshake_status(&result);
    if let Ok(mut ws) = result {
        let _ = ws.close(None).await;
        // Read to the end so the close completes on both legs before the next attempt.
        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
    }
    status
}

#[tokio::test]
async fn a_device_churning_short_tunnels_is_held_back_alone_and_visibly() {
    let backend = ws_backend().await;
    // Default settings: the backoff is on (10 events a minute, then 5 s).
    let proxy = start_proxy("# defaults\n", backend.addr, "").await;
    let churner = [
        ("X-Firmware-Version", "3.7.2"),
        ("X-Device-Id", "churner-1"),
    ];
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(churn_once(&proxy, HOME, &churner).await);
    }
    let admitted = statuses.iter().filter(|s| **s == 101).count();
    let held = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(admitted + held, 40, "{statuses:?}");
    assert!((11..=14).contains(&admitted), "{statuses:?}");
    // Held back without backend contact.
    assert_eq!(backend.connections(), admitted);

    // Another device behind the same address, and one with no id at all, are admitted.
    let calm = [("X-Firmware-Version", "3.7.2"), ("X-Device-Id", "calm-1")];
    assert_eq!(churn_once(&proxy, HOME, &calm).await, 101);
    assert_eq!(
        churn_once(&proxy, HOME, &[("X-Firmware-Version", "3.7.2")]).await,
        101
    );
    // The churner is still held back, told when to come back.
    let (status, head, body) = get(proxy.addr, "/", &churner).await;
    assert_eq!(status, 503);
    assert_eq!(body, "reconnecting too often, retry later\n");
    assert!(header(&head, "retry-after").is_some(), "{head}");

    // Visible: metric, census row, access log with the version and the key kind, a WARN.
    assert!(
        metric(&proxy, "fwgate_backoff_held_back_total{key=\"device\"}")
            .await
            .unwrap_or(0.0)
            >= held as f64 + 1.0
    );
    let (_, versions) = admin_get(&proxy, "/v1/versions").await;
    let versions: serde_json::Value = serde_json::from_str(&versions).unwrap();
    let row = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == "3.7.2")
        .unwrap_or_else(|| panic!("3.7.2 listed: {versions}"));
    assert_eq!(row["held_back_last_minute"], held as u64 + 1, "{row}");
    assert_eq!(
        row["refused_last_hour"]["held_back"],
        held as u64 + 1,
        "{row}"
    );
    let logs = captured_logs();
    assert!(
        logs.lines().any(|l| l.contains("rule=backoff")
            && l.contains("churner-1")
            && l.contains("version=3.7.2")
            && l.contains("held_by=\"device\"")),
        "no access line names the version and key kind"
    );
    assert!(logs.contains("reconnect backoff is holding back devices"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_spoofed_device_id_from_another_address_cannot_get_the_device_held_back() {
    let backend = ws_backend().await;
    let rules = "[[rule]]\nname = \"bad\"\nversions = \">=3.8.0-b3\"\naction = \"deny\"\n";
    let proxy = start_proxy(rules, backend.addr, "").await;
    // Someone else sends the victim's id from 127.0.0.2 with a refused version, many times.
    let spoof = [
        ("X-Firmware-Version", "3.8.0-b3"),
        ("X-Device-Id", "victim-7"),
    ];
    let mut spoof_statuses = Vec::new();
    for _ in 0..30 {
        spoof_statuses.push(handshake_status(
            &ws_connect_from(ELSEWHERE, proxy.addr, "/ws", &spoof).await,
        ));
    }
    // That address is held back (503 after the threshold of refusals)...
    assert!(spoof_statuses.contains(&503), "{spoof_statuses:?}");
    // ...and the real device, from its own address, is not.
    let victim = [("X-Firmware-Version", "3.7.2"), ("X-Device-Id", "victim-7")];
    assert_eq!(churn_once(&proxy, HOME, &victim).await, 101);
    assert_eq!(backend.connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn long_lived_tunnels_ending_are_health_not_churn() {
    let backend = ws_backend().await;
    let proxy = start_proxy(
        "# defaults\n",
        backend.addr,
        "[limits.backoff]\nthreshold = 2\nshort_tunnel = \"150ms\"\n",
    )
    .await;
    let device = [("X-Firmware-Version", "3.7.2"), ("X-Device-Id", "steady-1")];
    for i in 0..6 {
        let mut ws = ws_connect_from(HOME, proxy.addr, "/ws", &device)
            .await
            .unwrap_or_else(|e| panic!("tunnel {i} refused: {e}"));
        // Outlive short_tunnel, then close: a healthy session ending.
        let lived = tokio::time::Instant::now() + std::time::Duration::from_millis(200);
        eventually("the tunnel outlived short_tunnel", || async {
            tokio::time::Instant::now() >= lived
        })
        .await;
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
    }
    // The same device churning short tunnels is held back after the threshold.
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(churn_once(&proxy, HOME, &device).await);
    }
    assert!(statuses.contains(&503), "{statuses:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn closes_fwgate_causes_never_count_against_a_device() {
    let backend = ws_backend().await;
    let proxy = start_proxy(
        "# defaults\n",
        backend.addr,
        "[limits.backoff]\nthreshold = 2\n",
    )
    .await;
    let device = [("X-Firmware-Version", "3.7.2"), ("X-Device-Id", "kept-1")];
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(
            ws_connect_from(HOME, proxy.addr, "/ws", &device)
                .await
                .unwrap(),
        );
    }
    // A kill-switch entry closes all five at once (policy), then is lifted before the device
    // retries: those closes are fwgate's doing.
    let (status, body) = admin_post(
        &proxy,
        "/v1/killswitch",
        Some(TEST_TOKEN),
        r#"{"versions": "3.7.2", "reason": "test", "id": "close-all", "drain": "0s"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    eventually("policy closed every tunnel", || async {
        proxy.gate.registry.is_empty()
    })
    .await;
    let (status, _) = admin_request(
        &proxy,
        "DELETE",
        "/v1/killswitch/close-all",
        Some(TEST_TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 200);
    drop(open);
    assert_eq!(churn_once(&proxy, HOME, &device).await, 101);
    proxy.stop().await;
}

#[tokio::test]
async fn keying_by_address_is_opt_in_and_holds_the_whole_address_back() {
    let backend = ws_backend().await;
    let rules = "[[rule]]\nname = \"bad\"\nversions = \">=3.8.0-b3\"\naction = \"deny\"\n";
    let proxy = start_proxy(
        rules,
        backend.addr,
        "[limits.backoff]\nkey = \"ip\"\nthreshold = 3\n",
    )
    .await;
    for _ in 0..4 {
        churn_once(&proxy, ELSEWHERE, &[("X-Firmware-Version", "3.8.0-b3")]).await;
    }
    // Every device behind that address is held back now (the documented NAT trade-off)...
    let good = [
        ("X-Firmware-Version", "3.7.2"),
        ("X-Device-Id", "neighbour"),
    ];
    assert_eq!(churn_once(&proxy, ELSEWHERE, &good).await, 503);
    // ...but not other addresses.
    assert_eq!(churn_once(&proxy, HOME, &good).await, 101);
    assert!(
        metric(&proxy, "fwgate_backoff_held_back_total{key=\"ip\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    proxy.stop().await;
}
