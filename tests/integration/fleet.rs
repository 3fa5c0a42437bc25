//! Fleet mode against a real etcd started by each test (skipped loudly without `etcd`): one
//! kill switch and one rule set for every instance, through outages, restarts, compactions,
//! conflicts and bad documents.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::etcd::{self, Etcd, Relay};
use crate::util::*;

const RULES: &str = "[defaults]\naction = \"allow\"\nmissing = \"allow\"\n";

/// `[fleet]` for a test member: fast heartbeats and short timeouts so failures show quickly.
fn fleet_config(endpoint: &str, id: &str, rules: bool) -> String {
    format!(
        "[fleet]\netcd = [\"{endpoint}\"]\ninstance_id = \"{id}\"\nrules = {rules}\nheartbeat_interval = \"500ms\"\nstall_timeout = \"1500ms\"\nconnect_timeout = \"300ms\"\nrequest_timeout = \"1s\"\n"
    )
}

async fn member(endpoint: &str, id: &str, upstream: std::net::SocketAddr) -> Proxy {
    start_proxy(RULES, upstream, &fleet_config(endpoint, id, false)).await
}

/// Members with these ids on one store, each synced and ready.
async fn synced<const N: usize>(
    endpoint: &str,
    upstream: std::net::SocketAddr,
    ids: [&str; N],
    rules: bool,
) -> [Proxy; N] {
    let mut members = Vec::with_capacity(N);
    for id in ids {
        members.push(start_proxy(RULES, upstream, &fleet_config(endpoint, id, rules)).await);
    }
    for p in &members {
        eventually("every member synced and ready", || ready(p)).await;
    }
    members
        .try_into()
        .unwrap_or_else(|_| unreachable!("one member per id"))
}

async fn status_for(proxy: &Proxy, version: Option<&str>) -> u16 {
    match version {
        Some(v) => get(proxy.addr, "/", &[("X-Firmware-Version", v)]).await.0,
        None => get(proxy.addr, "/", &[]).await.0,
    }
}

async fn add(proxy: &Proxy, body: &str) -> Value {
    let (status, text) = admin_post(proxy, "/v1/killswitch", Some(TEST_TOKEN), body).await;
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn fleet_json(proxy: &Proxy) -> Value {
    let (status, text) = admin_get(proxy, "/v1/fleet").await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn ready(proxy: &Proxy) -> bool {
    admin_get(proxy, "/readyz").await.0 == 200
}

/// A POST on the admin API with extra headers; returns (status, body).
async fn admin_post_with(
    proxy: &Proxy,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut extra = String::new();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nAuthorization: Bearer {TEST_TOKEN}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (s, _, b) = split_response(&raw_exchange(proxy.admin, req.as_bytes()).await);
    (s, b)
}

/// Runs the fwgate binary (off the runtime's threads); returns (success, stdout+stderr).
async fn fwgate(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_fwgate"))
            .args(&args)
            .env("FWGATE_ADMIN_TOKEN", TEST_TOKEN)
            .env("USER", "tester")
            .env_remove("FWGATE_CONFIG")
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "$ fwgate {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn three_instances_converge_after_add_and_after_remove() {
    if !etcd::available("three_instances_converge_after_add_and_after_remove") {
        return;
    }
    let etcd = Etcd::start().await;
    let backend = http_backend().await;
    let [a, b, c] = synced(&etcd.url(), backend.addr, ["a", "b", "c"], false).await;
    eventually("three live instances listed", || async {
        fleet_json(&a).await["instances"]
            .as_array()
            .is_some_and(|l| l.len() == 3)
    })
    .await;

    let started = Instant::now();
    let v = add(
        &a,
        r#"{"versions": ">=3.8.0-b3", "reason": "incident 2020-02-08", "id": "scan"}"#,
    )
    .await;
    // The answer comes once every live instance has applied the change: no waiting here.
    for p in [&a, &b, &c] {
        assert_eq!(status_for(p, Some("3.9.0-b1")).await, 503);
        assert_eq!(status_for(p, Some("3.8.0-b2")).await, 200);
    }
    let add_took = started.elapsed();
    assert_eq!(v["scope"], "fleet", "{v}");
    assert_eq!(v["fleet"]["lagging"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["fleet"]["applied"].as_array().unwrap().len(), 3, "{v}");
    let (_, list) = admin_get(&c, "/v1/killswitch").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["entries"][0]["id"], "scan");
    assert_eq!(list["entries"][0]["scope"], "fleet");
    assert!(list["entries"][0]["revision"].as_i64().unwrap() > 0);

    let started = Instant::now();
    let (status, text) =
        admin_request(&b, "DELETE", "/v1/killswitch/scan", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{text}");
    for p in [&a, &b, &c] {
        assert_eq!(status_for(p, Some("3.9.0-b1")).await, 200);
    }
    let remove_took = started.elapsed();
    eprintln!("fleet convergence over three instances: add {add_took:?}, remove {remove_took:?}");
    assert!(add_took < Duration::from_secs(5) && remove_took < Duration::from_secs(5));

    // Both changes left an audit record: who, why, before and after.
    let audit = etcd.range_prefix("/fwgate/audit/").await;
    assert_eq!(audit.len(), 2, "{audit:?}");
    let added: Value = serde_json::from_str(&audit[0].1).unwrap();
    assert_eq!(added["action"], "kill_add");
    assert_eq!(added["reason"], "incident 2020-02-08");
    assert_eq!(added["via"], "a");
    assert!(added["before"].is_null() && added["after"]["versions"] == ">=3.8.0-b3");
    let removed: Value = serde_json::from_str(&audit[1].1).unwrap();
    assert_eq!(removed["action"], "kill_remove");
    assert!(removed["after"].is_null() && removed["before"]["id"] == "scan");

    let f = fleet_json(&c).await;
    assert_eq!(f["instance"], "c");
    assert_eq!(f["store"]["connected"], true);
    assert_eq!(f["store"]["source"], "etcd");
    assert_eq!(f["converged"], true, "{f}");
    let propagated = metric(&c, "fwgate_fleet_propagation_seconds_count{store=\"etcd\"}").await;
    assert!(propagated >= Some(2.0), "{propagated:?}");
    assert_eq!(
        metric(&b, "fwgate_fleet_store_connected{store=\"etcd\"}").await,
        Some(1.0)
    );
    let applied = f["applied_revision"].as_f64().unwrap();
    assert!(applied > 0.0);
    assert_eq!(
        metric(&c, "fwgate_fleet_applied_revision{store=\"etcd\"}").await,
        Some(applied)
    );
    for p in [a, b, c] {
        p.stop().await;
    }
}

#[tokio::test]
async fn a_store_outage_never_loosens_enforcement_and_the_fleet_resyncs_after_it() {
    if !etcd::available("a_store_outage_never_loosens_enforcement") {
        return;
    }
    let mut etcd = Etcd::start().await;
    let backend = http_backend().await;
    let [a, b] = synced(&etcd.url(), backend.addr, ["a", "b"], false).await;
    add(
        &a,
        r#"{"versions": ">=3.8", "reason": "outage test", "id": "held"}"#,
    )
    .await;
    add(
        &a,
        r#"{"versions": "2.0.0", "reason": "short", "id": "short", "ttl": "2s"}"#,
    )
    .await;
    assert_eq!(status_for(&b, Some("2.0.0")).await, 503);

    etcd.stop();
    eventually("the outage is visible in /v1/fleet", || async {
        fleet_json(&a).await["store"]["connected"] == false
    })
    .await;
    assert_eq!(
        metric(&a, "fwgate_fleet_store_connected{store=\"etcd\"}").await,
        Some(0.0)
    );
    // Still enforcing, and still ready: the state is known.
    for p in [&a, &b] {
        assert_eq!(status_for(p, Some("3.9.0")).await, 503);
        assert!(ready(p).await);
    }
    // Expiry is each instance's own business: it works while the store is down.
    for p in [&a, &b] {
        eventually("the short entry expires with the store down", || async {
            status_for(p, Some("2.0.0")).await == 200
        })
        .await;
    }
    assert_eq!(status_for(&a, Some("3.9.0")).await, 503);

    // Changes fail loudly, naming the store; a dry run fails the same way.
    for path in ["/v1/killswitch", "/v1/killswitch?dry_run=true"] {
        let (status, text) = admin_post(
            &a,
            path,
            Some(TEST_TOKEN),
            r#"{"versions": "*", "reason": "during the outage"}"#,
        )
        .await;
        assert_eq!(status, 503, "{path}: {text}");
        assert!(text.contains(&format!("etcd {}", etcd.url())), "{text}");
        assert!(text.contains("--local"), "{text}");
    }
    let (status, text) =
        admin_request(&a, "DELETE", "/v1/killswitch/held", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(status_for(&a, Some("3.9.0")).await, 503);
    // An explicit local entry is possible, and listed as local.
    let (status, text) = admin_post(
        &a,
        "/v1/killswitch?scope=local",
        Some(TEST_TOKEN),
        r#"{"versions": "<1", "reason": "local while the store is down", "id": "here"}"#,
    )
    .await;
    assert_eq!(status, 201, "{text}");
    assert_eq!(status_for(&a, Some("0.9.0")).await, 503);
    assert_eq!(status_for(&b, Some("0.9.0")).await, 200);
    let (_, list) = admin_get(&a, "/v1/killswitch").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let scopes: Vec<(&str, &str)> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_str().unwrap(), e["scope"].as_str().unwrap()))
        .collect();
    assert!(scopes.contains(&("held", "fleet")), "{scopes:?}");
    assert!(scopes.contains(&("here", "local")), "{scopes:?}");

    // The store comes back: both reconnect and follow new changes again.
    etcd.restart().await;
    for p in [&a, &b] {
        eventually("reconnected", || async {
            fleet_json(p).await["store"]["connected"] == true
        })
        .await;
    }
    // Heartbeats from before the outage are still in the store, but too old to count as live.
    eventually("both instances live again", || async {
        fleet_json(&b).await["instances"]
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|i| i["live"] == true))
    })
    .await;
    let v = add(
        &b,
        r#"{"versions": "1.5.0", "reason": "after the outage", "id": "after"}"#,
    )
    .await;
    // Both watches follow again: the write's answer says both applied it.
    assert_eq!(
        v["fleet"]["applied"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    assert_eq!(status_for(&a, Some("1.5.0")).await, 503);
    assert_eq!(status_for(&a, Some("0.9.0")).await, 503, "local entry kept");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_restart_with_the_store_down_starts_from_the_last_known_good_copy() {
    if !etcd::available("a_restart_with_the_store_down_starts_from_the_copy") {
        return;
    }
    let mut etcd = Etcd::start().await;
    let backend = http_backend().await;
    let config = fleet_config(&etcd.url(), "a", false);
    let a = start_proxy(RULES, backend.addr, &config).await;
    eventually("synced", || ready(&a)).await;
    add(
        &a,
        r#"{"versions": ">=3.8", "reason": "keep me", "id": "kept"}"#,
    )
    .await;
    let dir = a.stop_keep_dir().await;
    assert!(dir.path().join("state/fleet-state.json").exists());
    etcd.stop();
    // `fwgate explain` shows what this instance has in force, the fleet's entries included.
    let config_path = dir.path().join("fwgate.toml");
    let (ok, out) = fwgate(args(&[
        "explain",
        "3.9.0",
        "--config",
        config_path.to_str().unwrap(),
    ]))
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("kill-switch entry \"kept\""), "{out}");

    let a = start_proxy_in(dir, backend.addr, &config).await;
    // The copy is in force before the first request is served: no waiting.
    assert_eq!(status_for(&a, Some("3.9.0")).await, 503);
    assert_eq!(status_for(&a, Some("3.7.0")).await, 200);
    assert!(ready(&a).await);
    let f = fleet_json(&a).await;
    assert_eq!(f["store"]["source"], "cache", "{f}");
    assert_eq!(f["store"]["connected"], false, "{f}");
    assert_eq!(f["entries"], 1);
    a.stop().await;
}

#[tokio::test]
async fn a_new_instance_without_copy_or_store_admits_nothing_until_it_syncs() {
    if !etcd::available("a_new_instance_without_copy_or_store_admits_nothing") {
        return;
    }
    let mut etcd = Etcd::start().await;
    etcd.stop();
    let backend = http_backend().await;
    let a = member(&etcd.url(), "fresh", backend.addr).await;
    for v in [Some("1.0.0"), Some("garbage"), None] {
        let (status, head, body) = match v {
            Some(v) => get(a.addr, "/", &[("X-Firmware-Version", v)]).await,
            None => get(a.addr, "/", &[]).await,
        };
        assert_eq!(status, 503, "{v:?}: {body}");
        let retry: u64 = header(&head, "retry-after").unwrap().parse().unwrap();
        assert!((5..=15).contains(&retry), "{retry}");
        assert!(body.contains("not synced"), "{body}");
    }
    let (status, body) = admin_get(&a, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("not synced"), "{body}");
    assert_eq!(backend.connections(), 0);
    let (_, list) = admin_get(&a, "/v1/killswitch").await;
    assert!(list.contains("\"system\""), "{list}");

    etcd.restart().await;
    eventually("admits once synced", || async {
        status_for(&a, Some("1.0.0")).await == 200
    })
    .await;
    assert!(ready(&a).await);
    a.stop().await;
}

#[tokio::test]
async fn an_entry_deleted_during_a_disconnection_past_a_compaction_disappears() {
    if !etcd::available("an_entry_deleted_during_a_disconnection_past_a_compaction") {
        return;
    }
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client).await;
    let backend = http_backend().await;
    let a = member(&etcd.url(), "a", backend.addr).await;
    let c = member(&relay.url(), "c", backend.addr).await;
    for p in [&a, &c] {
        eventually("synced", || ready(p)).await;
    }
    add(&a, r#"{"versions": "1.1.0", "reason": "one", "id": "one"}"#).await;
    add(&a, r#"{"versions": "2.2.0", "reason": "two", "id": "two"}"#).await;
    assert_eq!(status_for(&c, Some("1.1.0")).await, 503);

    relay.cut();
    eventually("c sees the disconnection", || async {
        fleet_json(&c).await["store"]["connected"] == false
    })
    .await;
    let (status, text) =
        admin_request(&a, "DELETE", "/v1/killswitch/one", Some(TEST_TOKEN), "").await;
    assert_eq!(status, 200, "{text}");
    let v = add(
        &a,
        r#"{"versions": "3.3.0", "reason": "three", "id": "three"}"#,
    )
    .await;
    // c is named as lagging (it is still listed until its heartbeats stop counting).
    let _ = v;
    etcd.compact().await;
    assert_eq!(
        status_for(&c, Some("1.1.0")).await,
        503,
        "c keeps what it had"
    );

    relay.restore();
    eventually(
        "c resyncs: the deleted entry is gone, the new one is there",
        || async {
            status_for(&c, Some("1.1.0")).await == 200 && status_for(&c, Some("3.3.0")).await == 503
        },
    )
    .await;
    assert_eq!(status_for(&c, Some("2.2.0")).await, 503);
    assert!(
        metric(
            &c,
            "fwgate_fleet_watch_restarts_total{reason=\"compacted\"}"
        )
        .await
            >= Some(1.0)
    );
    a.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn a_stalled_watch_is_detected_and_replaced() {
    if !etcd::available("a_stalled_watch_is_detected_and_replaced") {
        return;
    }
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client).await;
    let backend = http_backend().await;
    let a = member(&etcd.url(), "a", backend.addr).await;
    let c = member(&relay.url(), "c", backend.addr).await;
    for p in [&a, &c] {
        eventually("synced", || ready(p)).await;
    }
    // A first change reaches c through its watch: the stream is established (freezing it while
    // it is being opened would make the open time out instead).
    add(
        &a,
        r#"{"versions": "0.0.1", "reason": "warm-up", "id": "warm-up"}"#,
    )
    .await;
    assert_eq!(status_for(&c, Some("0.0.1")).await, 503);
    assert_eq!(relay.freeze_watches(), 1);
    add(
        &a,
        r#"{"versions": "4.4.0", "reason": "stall", "id": "stall"}"#,
    )
    .await;
    // c's watch is silent; the periodic check sees the store ahead of it and replaces it.
    eventually("c notices the stall and catches up", || async {
        status_for(&c, Some("4.4.0")).await == 503
    })
    .await;
    eventually("the stalled watch's restart is counted", || async {
        metric(&c, "fwgate_fleet_watch_restarts_total{reason=\"stalled\"}").await >= Some(1.0)
    })
    .await;
    a.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn a_change_names_the_instances_that_have_not_applied_it() {
    if !etcd::available("a_change_names_the_instances_that_have_not_applied_it") {
        return;
    }
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client).await;
    let backend = http_backend().await;
    let a = member(&etcd.url(), "a", backend.addr).await;
    // c's stall detection is slow here, so its silent watch outlasts the 5 s wait.
    let slow = fleet_config(&relay.url(), "c", false)
        .replace("stall_timeout = \"1500ms\"", "stall_timeout = \"60s\"")
        .replace(
            "heartbeat_interval = \"500ms\"",
            "heartbeat_interval = \"1s\"",
        );
    let c = start_proxy(RULES, backend.addr, &slow).await;
    for p in [&a, &c] {
        eventually("synced", || ready(p)).await;
    }
    // A first change reaches c through its watch: the stream is established (freezing it while
    // it is being opened would make the open time out instead).
    add(
        &a,
        r#"{"versions": "0.0.1", "reason": "warm-up", "id": "warm-up"}"#,
    )
    .await;
    assert_eq!(status_for(&c, Some("0.0.1")).await, 503);
    assert_eq!(relay.freeze_watches(), 1);
    let (ok, out) = fwgate(args(&[
        "kill",
        "add",
        "6.6.6",
        "--reason",
        "lag test",
        "--admin",
        &format!("http://{}", a.admin),
    ]))
    .await;
    assert!(
        !ok,
        "{out}\n{}",
        captured_logs()
            .lines()
            .filter(|l| l.contains("fleet"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        out.contains("LAGGING") && out.contains("c (at revision"),
        "{out}"
    );
    assert!(out.contains("applied by 1"), "{out}");
    assert_eq!(status_for(&a, Some("6.6.6")).await, 503);
    a.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn concurrent_writers_cannot_overwrite_each_other() {
    if !etcd::available("concurrent_writers_cannot_overwrite_each_other") {
        return;
    }
    let etcd = Etcd::start().await;
    let backend = http_backend().await;
    let [a, b] = synced(&etcd.url(), backend.addr, ["a", "b"], false).await;
    // Two operators create the same entry at once, each through its own instance, each
    // requiring that it does not exist yet: exactly one wins.
    let new_only = [("X-Fwgate-Expect-Revision", "0")];
    let (ra, rb) = tokio::join!(
        admin_post_with(
            &a,
            "/v1/killswitch",
            &new_only,
            r#"{"versions": ">=3.8", "reason": "operator one", "id": "race"}"#
        ),
        admin_post_with(
            &b,
            "/v1/killswitch",
            &new_only,
            r#"{"versions": ">=4", "reason": "operator two", "id": "race"}"#
        ),
    );
    let mut statuses = [ra.0, rb.0];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{ra:?} {rb:?}");
    let loser = if ra.0 == 409 { &ra.1 } else { &rb.1 };
    let loser: Value = serde_json::from_str(loser).unwrap();
    let why = loser["error"].as_str().unwrap();
    assert!(
        why.contains("\"race\"") && why.contains("revision"),
        "{why}"
    );
    let winner = if ra.0 == 201 {
        "operator one"
    } else {
        "operator two"
    };
    for p in [&a, &b] {
        eventually("both hold the winner's entry", || async {
            admin_get(p, "/v1/killswitch").await.1.contains(winner)
        })
        .await;
    }
    // A writer working from a stale revision is refused too.
    let (_, list) = admin_get(&b, "/v1/killswitch").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let rev = list["entries"][0]["revision"].as_i64().unwrap();
    let stale = (rev - 1).to_string();
    let (status, text) = admin_post_with(
        &b,
        "/v1/killswitch",
        &[("X-Fwgate-Expect-Revision", stale.as_str())],
        r#"{"versions": ">=5", "reason": "stale", "id": "race"}"#,
    )
    .await;
    assert_eq!(status, 409, "{text}");
    assert!(admin_get(&a, "/v1/killswitch").await.1.contains(winner));
    // The CLI sending the same change to two instances is not a conflict.
    let (ok, out) = fwgate(args(&[
        "kill",
        "add",
        ">=7",
        "--reason",
        "fan-out",
        "--id",
        "same",
        "--admin",
        &format!("http://{}", a.admin),
        "--admin",
        &format!("http://{}", b.admin),
    ]))
    .await;
    assert!(ok, "{out}");
    assert_eq!(out.matches("fleet: revision").count(), 2, "{out}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn invalid_documents_written_into_etcd_are_refused_by_every_instance() {
    if !etcd::available("invalid_documents_written_into_etcd_are_refused") {
        return;
    }
    let etcd = Etcd::start().await;
    let backend = http_backend().await;
    let [a, b] = synced(&etcd.url(), backend.addr, ["a", "b"], true).await;
    // Until something is published, the local rules file is in force.
    assert_eq!(status_for(&a, Some("1.0.0")).await, 200);
    let doc = |text: &str| {
        serde_json::json!({
            "seq": 1, "text": text, "author": "hand", "published_at_ms": 0,
            "hash": fwgate::rules::content_hash(text.as_bytes()), "summary": "by hand"
        })
        .to_string()
    };
    let good = "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"old\"\nversions = \"<2\"\naction = \"deny\"\n";
    etcd.put("/fwgate/state/rules", doc(good).as_bytes()).await;
    for p in [&a, &b] {
        eventually("the store's rules apply", || async {
            status_for(p, Some("1.0.0")).await == 403
        })
        .await;
    }
    let (_, rules) = admin_get(&a, "/v1/rules").await;
    assert!(rules.contains("etcd:/fwgate/state/rules@"), "{rules}");

    // Valid envelope, invalid rules: refused, the rules in force stay, and it is reported.
    etcd.put(
        "/fwgate/state/rules",
        doc("[[rule]]\nname = \"x\"\nversions = \">=3.8,\"\naction = \"deny\"\n").as_bytes(),
    )
    .await;
    for p in [&a, &b] {
        eventually("the invalid rules are reported", || async {
            let (_, r) = admin_get(p, "/v1/rules").await;
            let r: Value = serde_json::from_str(&r).unwrap();
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("etcd:/fwgate/state/rules@") && e.contains(":3:"))
        })
        .await;
        assert_eq!(status_for(p, Some("1.0.0")).await, 403, "rules kept");
        assert!(metric(p, "fwgate_rules_reloads_total{result=\"error\"}").await >= Some(1.0));
    }
    // Not even a rules document.
    etcd.put("/fwgate/state/rules", b"[[rule]] # raw TOML, not published")
        .await;
    for p in [&a, &b] {
        eventually("a raw document is reported", || async {
            admin_get(p, "/v1/rules")
                .await
                .1
                .contains("not a fwgate rules document")
        })
        .await;
        assert_eq!(status_for(p, Some("1.0.0")).await, 403);
    }
    // A broken kill-switch entry is ignored (and counted); a valid hand-written one applies.
    etcd.put(
        "/fwgate/state/killswitch/bad",
        br#"{"id": "bad", "versions": ">=3.8,"}"#,
    )
    .await;
    etcd.put(
        "/fwgate/state/killswitch/hand",
        br#"{"id": "hand", "versions": "5.5.5", "reason": "etcdctl", "created_at": 0}"#,
    )
    .await;
    for p in [&a, &b] {
        eventually("the hand-written entry applies", || async {
            status_for(p, Some("5.5.5")).await == 503
        })
        .await;
        assert_eq!(
            metric(
                p,
                "fwgate_fleet_invalid_documents_total{kind=\"killswitch\"}"
            )
            .await,
            Some(1.0)
        );
        assert!(fleet_json(p).await["store"]["last_invalid_document"]
            .as_str()
            .is_some_and(|e| e.contains("killswitch/bad")));
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn rules_push_history_diff_rollback_and_fleet_status_from_the_cli() {
    if !etcd::available("rules_push_history_diff_rollback_and_fleet_status") {
        return;
    }
    let etcd = Etcd::start().await;
    let backend = http_backend().await;
    let [a, b] = synced(&etcd.url(), backend.addr, ["a", "b"], true).await;
    let ops = tempfile::tempdir().unwrap();
    let config = ops.path().join("fwgate.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"state\"\n{}",
            fleet_config(&etcd.url(), "cli", true)
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let file = |name: &str, text: &str| {
        let p = ops.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let r1 = file(
        "r1.toml",
        "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"old\"\nversions = \"<2\"\naction = \"deny\"\n",
    );
    let r2 = file(
        "r2.toml",
        "[defaults]\naction = \"allow\"\n[[rule]]\nname = \"old\"\nversions = \"<3\"\naction = \"deny\"\n[[rule]]\nname = \"new\"\nversions = \">=9\"\naction = \"deny\"\n",
    );
    let bad = file(
        "bad.toml",
        "[[rule]]\nname = \"x\"\nversions = \">=3.8.0-b3 || ~3.9\"\naction = \"deny\"\n",
    );

    let (ok, out) = fwgate(args(&["rules", "push", &r1, "--config", &config])).await;
    assert!(ok, "{out}");
    assert!(out.contains("published rules #1"), "{out}");
    assert!(out.contains("applied by 2 live instance(s)"), "{out}");
    for p in [&a, &b] {
        assert_eq!(status_for(p, Some("1.0.0")).await, 403);
        assert_eq!(status_for(p, Some("2.5.0")).await, 200);
    }
    let (ok, out) = fwgate(args(&["rules", "push", &bad, "--config", &config])).await;
    assert!(!ok, "{out}");
    assert!(out.contains("bad.toml:3:"), "{out}");
    assert!(out.contains("not published"), "{out}");
    let (ok, out) = fwgate(args(&["rules", "push", &r2, "--config", &config])).await;
    assert!(ok, "{out}");
    assert!(out.contains("2 rules; +new ~old"), "{out}");
    for p in [&a, &b] {
        assert_eq!(status_for(p, Some("2.5.0")).await, 403);
        assert_eq!(status_for(p, Some("9.0.0")).await, 403);
    }

    let (ok, history) = fwgate(args(&["rules", "history", "--config", &config])).await;
    assert!(ok, "{history}");
    let lines: Vec<&str> = history.lines().skip(2).collect();
    assert_eq!(lines.len(), 2, "{history}");
    let revs: Vec<i64> = lines
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(revs[0] > revs[1], "newest first: {history}");
    let hash2 = fwgate::rules::content_hash(std::fs::read(&r2).unwrap().as_slice());
    assert!(
        lines[0].contains(&hash2) && lines[0].contains("tester"),
        "{history}"
    );
    assert!(lines[1].contains("1 rule; first publication"), "{history}");

    let (ok, diff) = fwgate(args(&[
        "rules",
        "diff",
        &revs[1].to_string(),
        &revs[0].to_string(),
        "--config",
        &config,
    ]))
    .await;
    assert!(ok, "{diff}");
    assert!(diff.contains("-versions = \"<2\""), "{diff}");
    assert!(diff.contains("+versions = \"<3\""), "{diff}");
    assert!(diff.contains("+name = \"new\""), "{diff}");

    let (ok, out) = fwgate(args(&[
        "rules",
        "rollback",
        &revs[1].to_string(),
        "--config",
        &config,
    ]))
    .await;
    assert!(ok, "{out}");
    for p in [&a, &b] {
        assert_eq!(status_for(p, Some("2.5.0")).await, 200);
        assert_eq!(status_for(p, Some("9.0.0")).await, 200);
        assert_eq!(status_for(p, Some("1.0.0")).await, 403);
    }
    let (_, history) = fwgate(args(&["rules", "history", "--config", &config])).await;
    assert_eq!(history.lines().count(), 2 + 3, "{history}");
    assert!(
        history
            .lines()
            .nth(2)
            .unwrap()
            .contains("1 rule; -new ~old"),
        "{history}"
    );

    let (ok, status) = fwgate(args(&["fleet", "status", "--config", &config])).await;
    assert!(ok, "{status}");
    assert!(status.contains(&format!("etcd {}", etcd.url())), "{status}");
    assert!(status.contains("2 live, all at revision"), "{status}");
    for id in ["a ", "b "] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(id) && l.ends_with("ok")),
            "{status}"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn kill_list_says_when_instances_disagree() {
    // The measured failure of issue 15: two independent instances, one entry on one of them.
    let backend = http_backend().await;
    let a = start_proxy(RULES, backend.addr, "").await;
    let b = start_proxy(RULES, backend.addr, "").await;
    add(
        &a,
        r#"{"versions": ">=3.8", "reason": "only on a", "id": "lonely"}"#,
    )
    .await;
    let (ok, out) = fwgate(args(&[
        "kill",
        "list",
        "--admin",
        &format!("http://{}", a.admin),
        "--admin",
        &format!("http://{}", b.admin),
    ]))
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("DISAGREE"), "{out}");
    assert!(out.contains("lonely") && out.contains("MISSING"), "{out}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn etcd_over_tls_with_a_client_certificate() {
    if !etcd::available("etcd_over_tls_with_a_client_certificate") {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let pki = etcd::Pki::write(certs.path());
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let etcd = Etcd::start_with(&[
        "--cert-file",
        &s(&pki.server_cert),
        "--key-file",
        &s(&pki.server_key),
        "--trusted-ca-file",
        &s(&pki.ca),
        "--client-cert-auth",
    ])
    .await;
    let url = format!("https://{}", etcd.client);
    let backend = http_backend().await;
    let tls = format!(
        "{}ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        fleet_config(&url, "tls", false),
        s(&pki.ca),
        s(&pki.client_cert),
        s(&pki.client_key)
    );
    let a = start_proxy(RULES, backend.addr, &tls).await;
    eventually("synced over TLS with a client certificate", || ready(&a)).await;
    let v = add(
        &a,
        r#"{"versions": ">=3.8", "reason": "over TLS", "id": "tls"}"#,
    )
    .await;
    assert_eq!(v["fleet"]["applied"][0], "tls", "{v}");
    assert_eq!(status_for(&a, Some("3.9.0")).await, 503);

    // Without the client certificate etcd refuses the handshake: never synced, and it says why.
    let no_cert = format!(
        "{}ca_file = \"{}\"\n",
        fleet_config(&url, "anonymous", false),
        s(&pki.ca)
    );
    let b = start_proxy(RULES, backend.addr, &no_cert).await;
    eventually("the refusal is reported", || async {
        fleet_json(&b).await["store"]["last_error"].is_string()
    })
    .await;
    assert!(!ready(&b).await);
    assert_eq!(status_for(&b, Some("1.0.0")).await, 503);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn etcd_auth_with_a_password_file_survives_token_expiry() {
    if !etcd::available("etcd_auth_with_a_password_file_survives_token_expiry") {
        return;
    }
    // Tokens that expire after one idle second.
    let etcd = Etcd::start_with(&["--auth-token", "simple", "--auth-token-ttl", "1"]).await;
    etcd.wait_healthy().await;
    for (path, body) in [
        (
            "/v3/auth/user/add",
            serde_json::json!({"name": "root", "password": "s3cret pw"}),
        ),
        (
            "/v3/auth/user/grant",
            serde_json::json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/enable", serde_json::json!({})),
    ] {
        let v = etcd.call(path, body).await;
        assert!(v.get("error").is_none(), "{path}: {v}");
    }
    let backend = http_backend().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), RULES).unwrap();
    std::fs::write(dir.path().join("etcd.password"), "s3cret pw\n").unwrap();
    // Heartbeats and checks 2 s apart: the token expires between two uses.
    let config = format!(
        "[fleet]\netcd = [\"{}\"]\ninstance_id = \"auth\"\nusername = \"root\"\npassword_file = \"etcd.password\"\nheartbeat_interval = \"2s\"\nstall_timeout = \"6s\"\nrequest_timeout = \"1s\"\n",
        etcd.url()
    );
    let a = start_proxy_in(dir, backend.addr, &config).await;
    eventually("synced with a password", || ready(&a)).await;
    let marker = format!("store=etcd {}", etcd.url());
    eventually("authenticated again after the token expired", || async {
        captured_logs()
            .lines()
            .filter(|l| l.contains("authenticated to etcd") && l.contains(&marker))
            .count()
            >= 2
    })
    .await;
    let v = add(
        &a,
        r#"{"versions": ">=3.8", "reason": "with auth", "id": "auth"}"#,
    )
    .await;
    assert_eq!(v["fleet"]["lagging"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(status_for(&a, Some("3.9.0")).await, 503);
    assert!(
        !captured_logs().contains("s3cret"),
        "the password must never be logged"
    );
    a.stop().await;
}
