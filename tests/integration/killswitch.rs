//! The emergency kill switch: instant, persisted, expiring, audited, fleet-wide.

use std::process::Command;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

const RULES: &str = "[defaults]\naction = \"allow\"\nmissing = \"allow\"\n";

async fn status_for(proxy: &Proxy, version: Option<&str>) -> u16 {
    match version {
        Some(v) => get(proxy.addr, "/", &[("X-Firmware-Version", v)]).await.0,
        None => get(proxy.addr, "/", &[]).await.0,
    }
}

async fn add(proxy: &Proxy, body: &str) -> serde_json::Value {
    let (status, text) = admin_post(proxy, "/v1/killswitch", Some(TEST_TOKEN), body).await;
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn the_very_next_handshake_is_refused_and_removal_undoes_it() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let v = add(
        &proxy,
        r#"{"versions": ">=3.8.0-b3", "reason": "incident 2020-02-08", "id": "scan"}"#,
    )
    .await;
    assert_eq!(v["entry"]["status"], 503);
    // No waiting: the API answered, so the entry is in force.
    let (status, head, body) = get(proxy.addr, "/", &[("X-Firmware-Version", "3.9.0-b1")]).await;
    assert_eq!(status, 503);
    assert!(body.contains("incident 2020-02-08"), "{body}");
    let retry: u64 = header(&head, "retry-after").unwrap().parse().unwrap();
    assert!((150..=450).contains(&retry), "{retry}");
    assert_eq!(status_for(&proxy, Some("3.8.0-b2")).await, 200);
    assert_eq!(
        metric(
            &proxy,
            "fwgate_decisions_total{decision=\"deny\",rule=\"killswitch:scan\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(metric(&proxy, "fwgate_killswitch_entries").await, Some(1.0));
    let (status, list) = admin_get(&proxy, "/v1/killswitch").await;
    assert_eq!(status, 200);
    assert!(list.contains("\"scan\""), "{list}");
    let (status, _) = admin_request(
        &proxy,
        "DELETE",
        "/v1/killswitch/scan",
        Some(TEST_TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(status_for(&proxy, Some("3.9.0-b1")).await, 200);
    assert_eq!(
        metric(&proxy, "fwgate_killswitch_changes_total{action=\"remove\"}").await,
        Some(1.0)
    );
    let logs = captured_logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("kill_add") && l.contains("incident 2020-02-08")),
        "no audit line"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn entries_survive_a_restart() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    add(&proxy, r#"{"versions": "3.8.*", "reason": "persist me"}"#).await;
    let dir = proxy.stop_keep_dir().await;
    assert!(dir.path().join("state/killswitch.json").exists());
    let proxy = start_proxy_in(dir, backend.addr, "").await;
    assert_eq!(status_for(&proxy, Some("3.8.0-b1")).await, 503);
    assert_eq!(status_for(&proxy, Some("3.9.0")).await, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn ttl_expiry_stops_the_entry_on_its_own() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    add(
        &proxy,
        r#"{"versions": "*", "reason": "short", "ttl": "1s"}"#,
    )
    .await;
    assert_eq!(status_for(&proxy, Some("1.0.0")).await, 503);
    eventually("entry expired", || async {
        status_for(&proxy, Some("1.0.0")).await == 200
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn maintenance_mode_refuses_everything_and_never_reaches_the_backend() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    add(
        &proxy,
        r#"{"versions": "*", "reason": "maintenance", "status": 503}"#,
    )
    .await;
    for v in [Some("0.0.1"), Some("99.0.0-rc1"), Some("garbage"), None] {
        assert_eq!(status_for(&proxy, v).await, 503, "{v:?}");
    }
    assert_eq!(backend.connections(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn close_existing_closes_matching_websockets_and_only_those() {
    let backend = ws_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let mut bad = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "3.8.0-b4")])
        .await
        .unwrap();
    let mut good = ws_connect(proxy.addr, "/ws", &[("X-Firmware-Version", "3.8.0-b2")])
        .await
        .unwrap();
    // Dry run reports the impact and changes nothing.
    let (status, text) = admin_post(
        &proxy,
        "/v1/killswitch?dry_run=true",
        Some(TEST_TOKEN),
        r#"{"versions": ">=3.8.0-b3", "reason": "x"}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["impact"]["matching_connections"], 1);
    let (_, list) = admin_get(&proxy, "/v1/killswitch").await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        list["entries"].as_array().unwrap().len(),
        0,
        "dry run must not apply"
    );

    let v = add(
        &proxy,
        r#"{"versions": ">=3.8.0-b3", "reason": "x", "drain": "1s"}"#,
    )
    .await;
    assert_eq!(v["impact"]["matching_connections"], 1);
    assert_eq!(v["impact"]["closing"], 1);
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match bad.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "matching tunnel was not closed");
    good.send(Message::text("alive")).await.unwrap();
    assert_eq!(good.next().await.unwrap().unwrap(), Message::text("alive"));
    proxy.stop().await;
}

#[tokio::test]
async fn corrupt_state_falls_back_to_the_backup() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    add(
        &proxy,
        r#"{"versions": ">=3.8", "reason": "first", "id": "first"}"#,
    )
    .await;
    add(
        &proxy,
        r#"{"versions": ">=5", "reason": "second", "id": "second"}"#,
    )
    .await;
    let dir = proxy.stop_keep_dir().await;
    std::fs::write(
        dir.path().join("state/killswitch.json"),
        "{ this is not json",
    )
    .unwrap();
    let proxy = start_proxy_in(dir, backend.addr, "").await;
    // The backup holds the state before the last change: only "first".
    assert_eq!(status_for(&proxy, Some("3.9.0")).await, 503);
    assert_eq!(
        status_for(&proxy, Some("5.0.0")).await,
        503,
        "first covers >=3.8"
    );
    assert_eq!(
        metric(&proxy, "fwgate_killswitch_state_errors_total").await,
        Some(1.0)
    );
    let (_, list) = admin_get(&proxy, "/v1/killswitch").await;
    assert!(
        list.contains("\"first\"") && !list.contains("\"second\""),
        "{list}"
    );
    let dir = proxy.stop_keep_dir().await;
    // Neither readable: refuse to start, naming the file.
    std::fs::write(dir.path().join("state/killswitch.json.bak"), "also broken").unwrap();
    std::fs::write(dir.path().join("state/killswitch.json"), "broken").unwrap();
    let config = fwgate::config::Config::load(&dir.path().join("fwgate.toml")).unwrap();
    let metrics = std::sync::Arc::new(fwgate::metrics::Metrics::new());
    let rules =
        fwgate::rules::file::load(config.rules_path.as_ref().unwrap(), &metrics, 1).unwrap();
    let err = fwgate::gate::Gate::new(config, rules, metrics)
        .err()
        .expect("must refuse to start");
    assert!(err.contains("killswitch.json"), "{err}");
}

#[tokio::test]
async fn wrong_or_missing_token_changes_nothing() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let body = r#"{"versions": "*", "reason": "nope"}"#;
    assert_eq!(
        admin_post(&proxy, "/v1/killswitch", None, body).await.0,
        401
    );
    assert_eq!(
        admin_post(&proxy, "/v1/killswitch", Some("wrong"), body)
            .await
            .0,
        401
    );
    assert_eq!(
        admin_request(&proxy, "DELETE", "/v1/killswitch/x", Some("wrong"), "")
            .await
            .0,
        401
    );
    assert_eq!(status_for(&proxy, Some("1.0.0")).await, 200);
    assert!(!proxy.dir.path().join("state/killswitch.json").exists());
    // Bad input is a 400 that says what is wrong.
    let (s, text) = admin_post(
        &proxy,
        "/v1/killswitch",
        Some(TEST_TOKEN),
        r#"{"versions": ">=3.8,", "reason": "x"}"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(text.contains("versions"), "{text}");
    let (s, text) = admin_post(&proxy, "/v1/killswitch", Some(TEST_TOKEN), "{not json").await;
    assert_eq!(s, 400);
    assert!(text.contains("invalid JSON"), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn an_entry_written_by_hand_applies() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let state = proxy.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let tmp = state.join("edit.tmp");
    std::fs::write(&tmp, r#"{"entries": [{"id": "hand", "versions": "<2", "reason": "config management", "created_at": 0}]}"#).unwrap();
    std::fs::rename(&tmp, state.join("killswitch.json")).unwrap();
    eventually("hand-written entry applies", || async {
        status_for(&proxy, Some("1.5.0")).await == 503
    })
    .await;
    assert_eq!(status_for(&proxy, Some("2.0.0")).await, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn cli_acts_on_two_instances_at_once() {
    let backend = http_backend().await;
    let a = start_proxy(RULES, backend.addr, "").await;
    let b = start_proxy(RULES, backend.addr, "").await;
    let (url_a, url_b) = (format!("http://{}", a.admin), format!("http://{}", b.admin));
    let run = |args: Vec<String>| {
        let out = Command::new(env!("CARGO_BIN_EXE_fwgate"))
            .args(&args)
            .env("FWGATE_ADMIN_TOKEN", TEST_TOKEN)
            .env_remove("FWGATE_CONFIG")
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = vec!["kill".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend([
            "--admin".into(),
            url_a.clone(),
            "--admin".into(),
            url_b.clone(),
        ]);
        v
    };
    let (ok, out) = tokio::task::spawn_blocking({
        let args = args(&[
            "add",
            ">=3.8.0-b3",
            "--reason",
            "fleet test",
            "--ttl",
            "2h",
            "--id",
            "fleet",
        ]);
        move || run(args)
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert_eq!(out.matches("ok    ").count(), 2, "{out}");
    assert!(out.contains("undo: fwgate kill rm fleet"), "{out}");
    for p in [&a, &b] {
        assert_eq!(status_for(p, Some("3.8.0")).await, 503);
    }
    let (ok, out) = tokio::task::spawn_blocking({
        let args = args(&["list"]);
        move || run(args)
    })
    .await
    .unwrap();
    assert!(ok && out.matches("fleet").count() >= 2, "{out}");
    let (ok, out) = tokio::task::spawn_blocking({
        let args = args(&["rm", "fleet"]);
        move || run(args)
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    for p in [&a, &b] {
        assert_eq!(status_for(p, Some("3.8.0")).await, 200);
    }
    // One instance down: the command says so and fails.
    let dead = format!(
        "http://{}",
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    );
    let (ok, out) = tokio::task::spawn_blocking({
        let mut args = args(&["add", "*", "--reason", "x", "--dry-run"]);
        args.extend(["--admin".into(), dead]);
        move || run(args)
    })
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL"), "{out}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_bare_partial_version_is_refused_and_a_dry_run_fails_where_the_add_would() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let (status, body) = admin_post(
        &proxy,
        "/v1/killswitch",
        Some(TEST_TOKEN),
        r#"{"versions": "3.6", "reason": "INC-1"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("means exactly 3.6.0"), "{body}");
    assert!(body.contains("3.6.*") && body.contains("=3.6.0"), "{body}");
    // Nothing was added: 3.6.5 still connects.
    assert_eq!(status_for(&proxy, Some("3.6.5")).await, 200);
    // The CLI gets the same answer, dry run or not.
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec![
            "kill".to_string(),
            "add".into(),
            "3.6".into(),
            "--reason".into(),
            "INC-1".into(),
            "--admin".into(),
            format!("http://{}", proxy.admin),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_fwgate"))
                .args(&args)
                .env("FWGATE_ADMIN_TOKEN", TEST_TOKEN)
                .env_remove("FWGATE_CONFIG")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("3.6.*"), "{text}");
    }
    proxy.stop().await;

    // Without a state_dir an entry cannot be created, and a dry run says so too.
    let proxy = start_proxy(RULES, backend.addr, "# no state_dir\n").await;
    for path in ["/v1/killswitch?dry_run=true", "/v1/killswitch"] {
        let (status, body) = admin_post(
            &proxy,
            path,
            Some(TEST_TOKEN),
            r#"{"versions": "3.6.*", "reason": "INC-1"}"#,
        )
        .await;
        assert!(status >= 400, "{path}: {status} {body}");
        assert!(body.contains("state_dir"), "{path}: {body}");
    }
    proxy.stop().await;
}

/// A reason cannot forge audit lines, and one too long for every refused device is a 400.
#[tokio::test]
async fn a_reason_with_line_breaks_stays_on_its_audit_line_and_a_huge_one_is_refused() {
    let backend = http_backend().await;
    let proxy = start_proxy(RULES, backend.addr, "").await;
    let forged = "forgery-probe-7\\n2026-11-30T10:00:00.000000Z  WARN fwgate::audit: kill-switch entry removed action=\\\"kill_remove\\\" id=forgery-probe-7\\r\\u001b[2K";
    add(
        &proxy,
        &format!(
            r#"{{"versions": ">=9", "reason": "{forged}", "id": "forgery-probe-7", "ttl": "1h"}}"#
        ),
    )
    .await;
    let logs = captured_logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("forgery-probe-7"))
        .collect();
    assert_eq!(lines.len(), 1, "one audit line, nothing forged: {lines:#?}");
    let line = lines[0];
    assert!(line.contains("kill-switch entry added"), "{line}");
    assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{line:?}");
    // The audit line names the expiry as a value; with no X-Fwgate-Actor there is no `by`.
    assert!(line.contains(" expires_at=1"), "{line}");
    assert!(!line.contains("Some(") && !line.contains("by="), "{line}");

    let huge = "x".repeat(2000);
    let (status, text) = admin_post(
        &proxy,
        "/v1/killswitch",
        Some(TEST_TOKEN),
        &format!(r#"{{"versions": "*", "reason": "{huge}"}}"#),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("at most 1024"), "{text}");
    assert_eq!(status_for(&proxy, Some("1.0.0")).await, 200);
    proxy.stop().await;
}

/// A rules reload that switches `ordering` also switches the order the kill-switch entries are
/// decided in: `>=3.8.0-b3` holds `3.8.0-b10` in the firmware ordering, not in SemVer's
/// (where `b10` sorts before `b3`).
#[tokio::test]
async fn entries_follow_a_rules_reload_that_switches_ordering() {
    let backend = http_backend().await;
    let proxy = start_proxy(
        "[version]\nordering = \"firmware\"\n[defaults]\naction = \"allow\"\n",
        backend.addr,
        "",
    )
    .await;
    add(
        &proxy,
        r#"{"versions": ">=3.8.0-b3", "reason": "ordering probe"}"#,
    )
    .await;
    assert_eq!(status_for(&proxy, Some("3.8.0-b10")).await, 503);
    std::fs::write(
        proxy.rules_path(),
        "[version]\nordering = \"semver\"\n[defaults]\naction = \"allow\"\n",
    )
    .unwrap();
    let (status, body) = admin_post(&proxy, "/v1/reload", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        status_for(&proxy, Some("3.8.0-b10")).await,
        200,
        "the entry still decides in the firmware ordering"
    );
    assert_eq!(status_for(&proxy, Some("3.8.0-b4")).await, 503);
    proxy.stop().await;
}
