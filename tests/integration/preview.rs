//! Seeing and checking a change before making it: the rules preview (API and
//! `fwgate check --preview` against two running instances), the kill-switch dry run's census
//! impact, explain as JSON, the audit trail, the rules diff and the backend's health.

use crate::util::*;

const RULES: &str = "# admit everything\n";

async fn traffic(proxy: &Proxy, version: &str, n: usize) {
    for _ in 0..n {
        let (status, _, _) = get(proxy.addr, "/", &[("X-Firmware-Version", version)]).await;
        assert_eq!(status, 200);
    }
}

const BLOCK: &str = "[[rule]]\nname = \"block-table-scan\"\nversions = \">=3.8.0-b3\"\naction = \"deny\"\n\n[[rule]]\nname = \"throttle-old\"\nversions = \"<3.0.0-0\"\naction = \"limit\"\nrate = \"10/s\"\n";

#[tokio::test]
async fn a_rules_preview_names_who_would_be_refused_or_limited_and_applies_nothing() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    traffic(&proxy, "3.7.2", 5).await;
    traffic(&proxy, "3.8.0-b4", 3).await;
    traffic(&proxy, "2.1.0", 2).await;
    let (status, body) = admin_post(&proxy, "/v1/rules/preview", None, BLOCK).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["valid"], true);
    let changes = v["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{v:#}");
    let refused = changes.iter().find(|c| c["version"] == "3.8.0-b4").unwrap();
    assert_eq!(refused["change"], "newly_refused");
    assert_eq!(refused["to"]["rule"], "block-table-scan");
    assert_eq!(refused["handshakes_last_minute"], 3);
    let limited = changes.iter().find(|c| c["version"] == "2.1.0").unwrap();
    assert_eq!(limited["change"], "newly_limited");
    assert_eq!(v["totals"]["newly_refused"]["handshakes_last_minute"], 3);
    // Nothing was applied: the refused version still gets through, no live series appeared.
    traffic(&proxy, "3.8.0-b4", 1).await;
    let (_, metrics) = admin_get(&proxy, "/metrics").await;
    assert!(
        !metrics.contains("block-table-scan"),
        "a preview created live series"
    );
    // An invalid file is a 422 with file:line:column, and changes nothing either.
    let (status, body) =
        admin_post(&proxy, "/v1/rules/preview", None, "[[rule]]\nname = 1\n").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("rules.toml:2:"), "{body}");
    proxy.stop().await;
}

#[tokio::test]
async fn check_preview_sums_the_impact_over_two_running_instances() {
    let backend = http_backend().await;
    let a = start_proxy(RULES, backend.addr, "").await;
    let b = start_proxy(RULES, backend.addr, "").await;
    traffic(&a, "3.8.0-b3", 4).await;
    traffic(&b, "3.8.0-b3", 2).await;
    traffic(&b, "3.9.1", 1).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), BLOCK).unwrap();
    std::fs::write(dir.path().join("fwgate.toml"), "rules = \"rules.toml\"\n").unwrap();
    let args = vec![
        "check".to_string(),
        "--config".into(),
        dir.path().join("fwgate.toml").display().to_string(),
        "--preview".into(),
        "--admin".into(),
        format!("http://{}", a.admin),
        "--admin".into(),
        format!("http://{}", b.admin),
    ];
    let (ok, text) = run_fwgate(args).await;
    assert!(ok, "{text}");
    assert!(text.contains("impact over 2 instance(s)"), "{text}");
    // 3.8.0-b3: 6 handshakes over both; 3.9.1: 1. Two versions newly refused, 7 per minute.
    assert!(
        text.lines().any(|l| l.contains("newly refused")
            && l.contains("2 version(s)")
            && l.trim_end().ends_with("7 handshakes/min")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("3.8.0-b3")
            && l.contains("allow (default)")
            && l.contains("deny (block-table-scan)")
            && l.trim_end().ends_with(" 6")),
        "{text}"
    );
    // One instance gone: said, and the command fails.
    let dead = format!(
        "http://{}",
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    );
    let config = dir.path().join("fwgate.toml").display().to_string();
    let admin_a = format!("http://{}", a.admin);
    let (ok, text) = run_fwgate(
        [
            "check",
            "--config",
            &config,
            "--preview",
            "--admin",
            &admin_a,
            "--admin",
            &dead,
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("FAIL") && text.contains("did not answer"),
        "{text}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_dry_run_explain_audit_diff_and_upstream_views() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    traffic(&proxy, "3.8.0-b3", 4).await;
    traffic(&proxy, "3.7.0", 2).await;
    // The dry run of an entry says which versions it would refuse and their traffic.
    let (status, body) = admin_post(
        &proxy,
        "/v1/killswitch?dry_run=true",
        Some(TEST_TOKEN),
        r#"{"versions": ">=3.8.0-b3", "reason": "INC-7"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["census"]["handshakes_last_minute"], 4, "{v:#}");
    assert_eq!(v["census"]["versions"][0]["version"], "3.8.0-b3");

    // Explain as JSON, with the explain text.
    let (status, body) = admin_get(&proxy, "/v1/explain?version=v3.8.0B3&path=/ws").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], "3.8.0-b3");
    assert_eq!(v["decision"], "allow");
    assert!(
        v["text"].as_str().unwrap().contains("decision: ALLOW"),
        "{v}"
    );
    assert_eq!(admin_get(&proxy, "/v1/explain").await.0, 400);

    // A change shows up in the audit trail, and a reload in the rules diff.
    let (status, _) = admin_post(
        &proxy,
        "/v1/killswitch",
        Some(TEST_TOKEN),
        r#"{"versions": "=3.8.0-b3", "reason": "INC-7", "id": "inc-7"}"#,
    )
    .await;
    assert_eq!(status, 201);
    std::fs::write(proxy.rules_path(), BLOCK).unwrap();
    let (status, body) = admin_post(&proxy, "/v1/reload", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = admin_get(&proxy, "/v1/audit").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let events = v["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["action"] == "kill_add" && e["id"] == "inc-7" && e["reason"] == "INC-7"),
        "{v:#}"
    );
    assert!(
        events.iter().any(|e| e["action"] == "rules_applied"),
        "{v:#}"
    );
    let (_, body) = admin_get(&proxy, "/v1/rules").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let diff = &v["diff_from_previous"];
    assert_eq!(diff["from_generation"], 1, "{v:#}");
    let lines = diff["lines"].as_array().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l["op"] == "-" && l["text"] == "# admit everything"),
        "{diff}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["op"] == "+" && l["text"] == "name = \"block-table-scan\""),
        "{diff}"
    );

    // The backend answered every admitted request.
    let (_, body) = admin_get(&proxy, "/v1/upstream").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "ok", "{v}");
    assert_eq!(v["last_minute"]["samples"], 6, "{v}");
    proxy.stop().await;
}

/// In fleet mode `fwgate check --preview` needs no `--admin`: it asks every live instance the
/// store lists.
#[tokio::test]
async fn in_fleet_mode_check_preview_asks_every_live_instance() {
    if !crate::etcd::available("in_fleet_mode_check_preview_asks_every_live_instance") {
        return;
    }
    let etcd = crate::etcd::Etcd::start().await;
    let backend = http_backend().await;
    let fleet = |id: &str| {
        format!(
            "[fleet]\netcd = [\"{}\"]\ninstance_id = \"{id}\"\nheartbeat_interval = \"200ms\"\n",
            etcd.url()
        )
    };
    let a = start_proxy(RULES, backend.addr, &fleet("a")).await;
    let b = start_proxy(RULES, backend.addr, &fleet("b")).await;
    for p in [&a, &b] {
        eventually("synced with the store", || async {
            admin_get(p, "/readyz").await.0 == 200
        })
        .await;
    }
    traffic(&a, "3.8.0-b3", 2).await;
    traffic(&b, "3.8.0-b3", 3).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), BLOCK).unwrap();
    std::fs::write(
        dir.path().join("fwgate.toml"),
        format!(
            "rules = \"rules.toml\"\nstate_dir = \"state\"\n{}",
            fleet("cli")
        ),
    )
    .unwrap();
    let config = dir.path().join("fwgate.toml").display().to_string();
    eventually("both instances heartbeat", || async {
        let (_, body) = admin_get(&a, "/v1/fleet").await;
        body.matches("\"applied_revision\"").count() >= 2
    })
    .await;
    let (ok, text) = run_fwgate(
        ["check", "--config", &config, "--preview"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("impact over 2 instance(s)"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("3.8.0-b3") && l.trim_end().ends_with(" 5")),
        "{text}"
    );
    a.stop().await;
    b.stop().await;
}
